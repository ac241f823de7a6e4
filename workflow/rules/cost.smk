# What each job of this run cost and the projected hours of the paper-scale DAG (bench/cost.py):
# results/<scale>/cost.{csv,md}. `make rehearsal` asks for all_with_cost: every output and it.
from stablenets.bench.cost import benchmark_files


localrules:
    cost,


rule cost:
    input:
        # what the projection reads besides the jobs' benchmarks: a path misspelt stops the
        # DAG before any job (not the last one), a file edited reruns the report
        jobs=benchmark_files(config, B),
        paper_config=cost_paper_config,
        bench=config["cost"]["bench"],
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
                "schema": CONFIG_SCHEMA,
            },
            sort_keys=True,
        ),
    shell:
        "exec python -m stablenets cost --spec {params.spec:q} --inputs {input.jobs}"
        " --out {output.csv} > {log} 2>&1"


rule all_with_cost:
    input:
        final_outputs(),
        R("cost.csv"),
