# BSDS500 denoising: train every denoiser per noise level and seed; PSNR and Lipschitz audit.


rule train_denoiser:
    input:
        data=R("data/bsds500.h5"),
    output:
        model=R("models/denoising/sigma{sigma}/{variant}/seed{seed}/model.pt"),
        log=R("models/denoising/sigma{sigma}/{variant}/seed{seed}/train_log.csv"),
    log:
        L("train_denoiser/sigma{sigma}/{variant}/seed{seed}.log"),
    benchmark:
        B("train_denoiser/sigma{sigma}/{variant}/seed{seed}.tsv")
    wildcard_constraints:
        variant=JOBS.variant_pattern("denoising"),
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        **JOBS.resources("train_denoiser"),
    params:
        spec=lambda w: JOBS.train_spec("denoising", w.variant, w.seed, w.sigma),
        workdir=lambda w: R(
            f"checkpoints/denoising/sigma{w.sigma}/{w.variant}/seed{w.seed}"
        ),
    shell:
        "exec python -m stablenets train --spec {params.spec:q} --data {input.data}"
        " --model {output.model} --log {output.log} --workdir {params.workdir} > {log} 2>&1"


rule evaluate_denoiser:
    input:
        model=R("models/denoising/sigma{sigma}/{variant}/seed{seed}/model.pt"),
        data=R("data/bsds500.h5"),
    output:
        R("eval/denoising/sigma{sigma}/{variant}/seed{seed}.h5"),
    log:
        L("evaluate_denoiser/sigma{sigma}/{variant}/seed{seed}.log"),
    benchmark:
        B("evaluate_denoiser/sigma{sigma}/{variant}/seed{seed}.tsv")
    wildcard_constraints:
        variant=JOBS.variant_pattern("denoising"),
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        **JOBS.resources("evaluate_denoiser"),
    params:
        spec=lambda w: JOBS.eval_spec("denoising", w.variant, w.seed, w.sigma),
        workdir=lambda w: R(
            f"checkpoints/eval/denoising/sigma{w.sigma}/{w.variant}/seed{w.seed}"
        ),
    shell:
        "exec python -m stablenets evaluate-denoiser --spec {params.spec:q} --model {input.model}"
        " --data {input.data} --out {output} --workdir {params.workdir} > {log} 2>&1"


rule evaluate_tv_denoising:
    input:
        data=R("data/bsds500.h5"),
    output:
        R("eval/denoising/sigma{sigma}/tv.h5"),
    log:
        L("evaluate_tv_denoising/sigma{sigma}.log"),
    benchmark:
        B("evaluate_tv_denoising/sigma{sigma}.tsv")
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        **JOBS.resources("evaluate_tv_denoising"),
    params:
        spec=lambda w: JOBS.tv_spec(w.sigma),
        workdir=lambda w: R(f"checkpoints/eval/denoising/sigma{w.sigma}/tv"),
    shell:
        "exec python -m stablenets evaluate-tv --spec {params.spec:q} --data {input.data}"
        " --out {output} --workdir {params.workdir} > {log} 2>&1"
