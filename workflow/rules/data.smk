# Datasets: checksummed download + safe extraction + HDF5 conversion, or the offline smoke sets.
# On a cluster it runs where Snakemake runs: compute nodes often cannot reach the internet.


localrules:
    prepare_data,


rule prepare_data:
    output:
        R("data/{dataset}.h5"),
    log:
        L("prepare_data/{dataset}.log"),
    benchmark:
        B("prepare_data/{dataset}.tsv")
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        **JOBS.resources("data"),
    params:
        spec=lambda w: JOBS.data_spec(w.dataset),
    # The cache folder is not a param (a rerun trigger): the checksummed archive makes the same
    # data wherever it is kept.
    shell:
        "python -m stablenets prepare-data --spec {params.spec:q} "
        "--cache {config[data][cache_dir]:q} --out {output} > {log} 2>&1"
