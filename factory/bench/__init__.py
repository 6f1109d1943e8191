"""`factory bench`: load generator, metrics per shared/reference/METRICS.md, JSON and HTML reports,
side by side with stock vLLM. No Ray or vLLM imports: it runs against any OpenAI endpoint."""
