"""Data sources: toy feature hierarchies with ground truth (``toy_data``) and the Wikipedia text
corpus with its tokenizer and token caches (``corpus``)."""
