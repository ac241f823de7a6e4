# Tables, figures and the summary: what a reader of the paper looks at.
# Seconds of pandas and matplotlib each: on a cluster they run where Snakemake runs instead of
# waiting in the queue as jobs of their own.
# Which tables and figures there are, and what each is built from, is the registry's
# (stablenets.pipeline.outputs: TABLES and FIGURES of common.smk, JOBS.inputs). Each one's report
# caption is workflow/report/<kind>s/<name>.rst; Snakemake takes one caption file per rule, so
# they are joined into one template per rule, kept under .snakemake/.
from stablenets.pipeline.outputs import KINDS, report_caption

CAPTIONS = {
    kind: report_caption(
        kind,
        os.path.join(workflow.basedir, "report"),
        os.path.join(".snakemake", "stablenets", "report", f"{kind}.rst"),
    )
    for kind in KINDS
}


localrules:
    table,
    figure,
    summary,


rule table:
    input:
        lambda w: JOBS.inputs("table", w.table, R),
    output:
        csv=report(
            R("tables/{table}.csv"),
            caption=CAPTIONS["table"],
            category="Tables",
        ),
        md=R("tables/{table}.md"),
        tex=R("tables/{table}.tex"),
    log:
        L("table/{table}.log"),
    wildcard_constraints:
        table="|".join(TABLES),
    conda:
        "../../environment.yml"
    resources:
        **JOBS.resources("table"),
    params:
        **JOBS.caption_params(),
        spec=lambda w: JOBS.report_spec("table", w.table),
    shell:
        "exec python -m stablenets table --spec {params.spec:q}"
        " --inputs {input} --out {output.csv} > {log} 2>&1"


rule figure:
    input:
        lambda w: JOBS.inputs("figure", w.figure, R),
    output:
        pdf=R("figures/{figure}.pdf"),
        png=report(
            R("figures/{figure}.png"),
            caption=CAPTIONS["figure"],
            category="Figures",
        ),
    log:
        L("figure/{figure}.log"),
    wildcard_constraints:
        figure="|".join(FIGURES),
    conda:
        "../../environment.yml"
    resources:
        **JOBS.resources("figure"),
    params:
        **JOBS.caption_params(),
        spec=lambda w: JOBS.report_spec("figure", w.figure),
    shell:
        "exec python -m stablenets figure --spec {params.spec:q}"
        " --inputs {input} --out {output.pdf} > {log} 2>&1"


rule summary:
    input:
        tables=expand(R("tables/{table}.md"), table=TABLES),
        figures=expand(R("figures/{figure}.png"), figure=FIGURES),
    output:
        report(R("summary.md"), caption="../report/summary.rst", category="Summary"),
    log:
        L("summary/summary.log"),
    conda:
        "../../environment.yml"
    resources:
        **JOBS.resources("summary"),
    params:
        spec=json.dumps({"scale": SCALE, "config": config}, sort_keys=True),
    shell:
        "exec python -m stablenets summary --spec {params.spec:q} --inputs {input.tables}"
        " --out {output} > {log} 2>&1"
