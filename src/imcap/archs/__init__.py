"""Captioning architectures besides the default VisionEncoderDecoder (which is `imcap.modeling`'s).

prefix.py  image tokens mapped into a GPT-2's input space, read as a prefix (seed 003)
lstm.py    pooled CNN features + a word-level LSTM, the merge baseline (seed 004)

Both are `PreTrainedModel`s with their own config classes, so a saved folder says what it holds
(`model_type` in config.json) and `imcap.modeling.load_model` builds the right class from it.
"""
