# Tables, figures and the summary: what a reader of the paper looks at.


def _figure_inputs(name):
    return {
        "robustness": JOBS.classification_evals(R),
        "training_classification": JOBS.classification_logs(R),
        "training_denoising": JOBS.denoising_logs(R),
        "denoising_examples": JOBS.denoising_evals(R),
        "pnp_convergence": JOBS.pnp_runs(R),
        "pnp_reconstructions": JOBS.pnp_runs(R),
    }[name]


def _table_inputs(name):
    return {
        "classification": JOBS.classification_evals(R),
        "denoising": JOBS.denoising_evals(R),
        "pnp": JOBS.pnp_runs(R),
    }[name]


rule table:
    input:
        lambda w: _table_inputs(w.table),
    output:
        csv=report(
            R("tables/{table}.csv"),
            caption="../report/table_{table}.rst",
            category="Tables",
        ),
        md=R("tables/{table}.md"),
        tex=R("tables/{table}.tex"),
    log:
        L("table/{table}.log"),
    wildcard_constraints:
        table="|".join(TABLES),
    resources:
        **JOBS.resources("report"),
    params:
        spec=lambda w: json.dumps({"kind": w.table}),
    shell:
        "{PY} -m stablenets table --spec {params.spec:q}"
        " --inputs {input} --out {output.csv} > {log} 2>&1"


rule figure:
    input:
        lambda w: _figure_inputs(w.figure),
    output:
        pdf=R("figures/{figure}.pdf"),
        png=report(
            R("figures/{figure}.png"),
            caption="../report/figure_{figure}.rst",
            category="Figures",
        ),
    log:
        L("figure/{figure}.log"),
    wildcard_constraints:
        figure="|".join(FIGURES),
    resources:
        **JOBS.resources("report"),
    params:
        spec=lambda w: json.dumps(
            {"kind": w.figure, "sigma": config["pnp"]["noise_level"]}
        ),
    shell:
        "{PY} -m stablenets figure --spec {params.spec:q}"
        " --inputs {input} --out {output.pdf} > {log} 2>&1"


rule summary:
    input:
        tables=expand(R("tables/{table}.md"), table=TABLES),
        figures=expand(R("figures/{figure}.png"), figure=FIGURES),
    output:
        report(R("summary.md"), caption="../report/summary.rst", category="Summary"),
    log:
        L("summary/summary.log"),
    resources:
        **JOBS.resources("report"),
    params:
        spec=json.dumps({"scale": SCALE, "config": config}, sort_keys=True),
    shell:
        "{PY} -m stablenets summary --spec {params.spec:q} --inputs {input.tables}"
        " --out {output} > {log} 2>&1"
