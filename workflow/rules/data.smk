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
    # The cache folder and the URLs are resources of the job, not params (a rerun trigger): the
    # checksummed archive makes the same data wherever it is kept and whichever mirror served it,
    # so moving the cache or adding a mirror reruns nothing.
    resources:
        **JOBS.resources("prepare_data"),
        cache=config["data"]["cache_dir"],
        urls=lambda w: JOBS.data_urls(w.dataset),
    params:
        spec=lambda w: JOBS.data_spec(w.dataset),
    shell:
        "exec python -m stablenets prepare-data --spec {params.spec:q} "
        "--cache {resources.cache:q} --urls {resources.urls:q} --out {output} > {log} 2>&1"
