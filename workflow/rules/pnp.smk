# Plug-and-Play deblurring with the trained denoisers, and the TV-regularised baseline.


rule pnp_deblur:
    input:
        model=R("models/denoising/sigma{sigma}/{variant}/seed{seed}/model.pt"),
        data=R("data/bsds500.h5"),
    output:
        R("pnp/sigma{sigma}/{variant}/seed{seed}.h5"),
    log:
        L("pnp_deblur/sigma{sigma}/{variant}/seed{seed}.log"),
    benchmark:
        B("pnp_deblur/sigma{sigma}/{variant}/seed{seed}.tsv")
    wildcard_constraints:
        variant=JOBS.variant_pattern("denoising"),
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        **JOBS.resources("pnp_deblur"),
    params:
        spec=lambda w: JOBS.pnp_spec(w.variant, w.seed, w.sigma),
        workdir=lambda w: R(f"checkpoints/pnp/sigma{w.sigma}/{w.variant}/seed{w.seed}"),
    shell:
        "exec python -m stablenets pnp --spec {params.spec:q} --model {input.model}"
        " --data {input.data} --out {output} --workdir {params.workdir} > {log} 2>&1"


rule tv_deblur:
    input:
        data=R("data/bsds500.h5"),
    output:
        R("pnp/tv.h5"),
    log:
        L("tv_deblur/tv.log"),
    benchmark:
        B("tv_deblur/tv.tsv")
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        **JOBS.resources("tv_deblur"),
    params:
        spec=JOBS.pnp_spec("tv", 0),
        workdir=R("checkpoints/pnp/tv"),
    shell:
        "exec python -m stablenets tv-deblur --spec {params.spec:q} --data {input.data}"
        " --out {output} --workdir {params.workdir} > {log} 2>&1"
