"""`dglm eval`: metrics, independent judges (VADER, TextBlob, toxicity, perplexity), held-out
prefixes, the targets of the steering issue and the markdown/JSON report."""
