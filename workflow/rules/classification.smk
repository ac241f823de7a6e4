# CIFAR-10 robustness: train each classifier variant and seed, then attack and certify it.


rule train_classifier:
    input:
        data=R("data/cifar10.h5"),
    output:
        model=R("models/classification/{variant}/seed{seed}/model.pt"),
        log=R("models/classification/{variant}/seed{seed}/train_log.csv"),
    log:
        L("train_classifier/{variant}/seed{seed}.log"),
    benchmark:
        B("train_classifier/{variant}/seed{seed}.tsv")
    wildcard_constraints:
        variant=JOBS.variant_pattern("classification"),
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        **JOBS.resources("train_classifier"),
    params:
        spec=lambda w: JOBS.train_spec("classification", w.variant, w.seed),
        workdir=lambda w: R(f"checkpoints/classification/{w.variant}/seed{w.seed}"),
    shell:
        "exec python -m stablenets train --spec {params.spec:q} --data {input.data}"
        " --model {output.model} --log {output.log} --workdir {params.workdir} > {log} 2>&1"


rule evaluate_classifier:
    input:
        model=R("models/classification/{variant}/seed{seed}/model.pt"),
        data=R("data/cifar10.h5"),
    output:
        R("eval/classification/{variant}/seed{seed}.h5"),
    log:
        L("evaluate_classifier/{variant}/seed{seed}.log"),
    benchmark:
        B("evaluate_classifier/{variant}/seed{seed}.tsv")
    wildcard_constraints:
        variant=JOBS.variant_pattern("classification"),
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        **JOBS.resources("evaluate_classifier"),
    params:
        spec=lambda w: JOBS.eval_spec("classification", w.variant, w.seed),
        workdir=lambda w: R(f"checkpoints/eval/classification/{w.variant}/seed{w.seed}"),
    shell:
        "exec python -m stablenets evaluate-classifier --spec {params.spec:q} --model {input.model}"
        " --data {input.data} --out {output} --workdir {params.workdir} > {log} 2>&1"
