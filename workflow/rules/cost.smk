# What each job of this run cost and the projected hours of the paper-scale DAG (bench/cost.py):
# results/<scale>/cost.{csv,md}. `make rehearsal` asks for all_with_cost: every output and it.
from stablenets.bench.cost import benchmark_files


localrules:
    cost,


rule cost:
    input:
        benchmark_files(config, B),
    output:
        csv=R("cost.csv"),
        md=R("cost.md"),
    log:
        L("cost/cost.log"),
    conda:
        "../../environment.yml"
    resources:
        **JOBS.resources("cost"),
    params:
        spec=json.dumps(
            {
                "config": config,
                "results": R(""),
                "benchmarks": B(""),
                "schema": str(workflow.source_path("../schemas/config.schema.yaml")),
            },
            sort_keys=True,
        ),
    shell:
        "exec python -m stablenets cost --spec {params.spec:q} --inputs {input}"
        " --out {output.csv} > {log} 2>&1"


rule all_with_cost:
    input:
        final_outputs(),
        R("cost.csv"),
