"""Llama 3's tokenizer conventions, shared by the built-in tokenizer (tools/make_builtin_tokenizer.py) and the test
fixture that imitates a Hub checkpoint's tokenizer (tests/tokenizer_fixture.py)."""

# Llama 3's first special tokens in id order (128000, 128001, ...); real checkpoints continue with
# <|reserved_special_token_3|> .. <|reserved_special_token_247|> up to 128255.
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
IMAGE_TOKEN = "<|image|>"  # Mllama's image placeholder: the id right after the text vocabulary

# The pre-tokenizer split pattern (tokenizer.json of every Llama 3.x checkpoint).
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
