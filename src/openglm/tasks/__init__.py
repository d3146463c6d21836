"""Fine-tuning and evaluation tasks (spec D): cloze classification, seq2seq, text infilling, zero-shot LM."""
