# Tables, figures and the summary: what a reader of the paper looks at.
