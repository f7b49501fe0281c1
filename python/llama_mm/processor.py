"""MllamaProcessor: prompts and images in, the tensors transformers' `MllamaProcessor` produces out.

Reads the same checkpoint files transformers reads (tokenizer.json, tokenizer_config.json, special_tokens_map.json
when tokenizer_config.json has no `added_tokens_decoder`, preprocessor_config.json, the chat template files listed
in chat_template.py, and generation_config.json / config.json for the stop tokens) and never imports transformers.

Prompt conventions (transformers' `processing_mllama.py`):
- A prompt without `<|begin_of_text|>` gets it inserted after its leading `<|image|>` tokens:
  "<|image|>Describe" -> "<|image|><|begin_of_text|>Describe". Chat-template output already starts with it.
- Each prompt must hold exactly as many `<|image|>` tokens as it is given images.
- cross_attention_mask[b, t, n, k] = 1 when token t of prompt b may attend to tile k of image n: from image n's
  token up to (not including) the next image token, or to the end of the (padded) sequence for the last image;
  consecutive image tokens all attend to everything after the group; tokens before the first image attend to
  nothing; only the image's real tiles are set.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from . import chat_template
from .image_loading import ImageLike, is_image_like, load_rgb
from .image_processing import ImageProcessor, ImageProcessorConfig

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_IMAGE_TOKEN = "<|image|>"  # what transformers' MllamaProcessor uses when the tokenizer names none


def _token_content(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token entry must be a string or {{'content': ...}}, got {value!r}")


class MllamaProcessor:
    """Tokenizer + chat template + image preprocessing for Llama 3.2 Vision checkpoints."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        special_tokens: dict[str, str],
        image_token: str = _DEFAULT_IMAGE_TOKEN,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] = (),
        padding_side: str = "right",
    ):
        """`special_tokens` maps names (bos_token, eos_token, pad_token, ...) to token strings."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.image_token = image_token
        self.image_token_id = self._id_of(image_token, "image token")
        self.bos_token = self.special_tokens.get("bos_token")
        self.bos_token_id = self._id_of(self.bos_token, "bos_token") if self.bos_token is not None else None
        pad = self.special_tokens.get("pad_token")
        self.pad_token_id = self._id_of(pad, "pad_token") if pad is not None else None
        eos = self.special_tokens.get("eos_token")
        self.eos_token_ids = tuple(eos_token_ids) or ((self._id_of(eos, "eos_token"),) if eos is not None else ())
        self.padding_side = _check_padding_side(padding_side)

    def _id_of(self, token: str, what: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, padding_side: str | None = None) -> "MllamaProcessor":
        """Load from a checkpoint directory (the files transformers' `MllamaProcessor.from_pretrained` reads).

        padding_side: None follows the checkpoint as transformers does (tokenizer_config.json's `padding_side`,
        "right" when absent); generation asks for "left" per call."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"checkpoint directory does not exist: {directory}")
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{directory} has no tokenizer.json (llama_mm reads only the fast-tokenizer format)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises bare Exception subclasses for bad files
            raise ValueError(f"cannot load {tokenizer_file}: {e}") from e
        tokenizer.no_padding()  # padding is done here, per call
        tokenizer.no_truncation()

        config = chat_template.read_json(directory / "tokenizer_config.json") or {}
        if padding_side is None:
            padding_side = config.get("padding_side", "right")
            if padding_side not in ("left", "right"):
                raise ValueError(f"{directory / 'tokenizer_config.json'}: padding_side must be 'left' or 'right', "
                                 f"got {padding_side!r}")
        named = {key: _token_content(config.get(key)) for key in _NAMED_SPECIAL_TOKENS}
        if "added_tokens_decoder" not in config:  # legacy checkpoints keep the names in special_tokens_map.json
            for key, value in (chat_template.read_json(directory / "special_tokens_map.json") or {}).items():
                if key in _NAMED_SPECIAL_TOKENS and named[key] is None:
                    named[key] = _token_content(value)
        named = {k: v for k, v in named.items() if v is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        model_specific = {k: _token_content(v) for k, v in extra.items()} if isinstance(extra, dict) else {}
        extra_list = [_token_content(v) for v in extra] if isinstance(extra, list) else list(model_specific.values())
        # transformers makes every named and extra special token a special added token (a no-op when it already is)
        to_add = [*named.values(), *extra_list]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in to_add])
        # tokenizer.json's post-processor decides whether <|begin_of_text|> is prepended; transformers 5.x keeps it
        # for PreTrainedTokenizerFast checkpoints even when tokenizer_config.json sets add_bos_token/add_eos_token.

        return cls(
            tokenizer,
            ImageProcessor(ImageProcessorConfig.from_file(directory / "preprocessor_config.json")),
            special_tokens={**named, **model_specific},
            image_token=model_specific.get("image_token", _DEFAULT_IMAGE_TOKEN),
            chat_template=chat_template.find_chat_template(directory),
            eos_token_ids=_eos_token_ids(directory),
            padding_side=padding_side,
        )

    # ----------------------------------------------------------------------------------------------- text

    def apply_chat_template(
        self,
        messages: list[dict] | list[list[dict]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs,
    ) -> str | list[str] | list[int] | list[list[int]]:
        """Render a conversation (or a list of them) with the checkpoint's chat template. Messages use the
        transformers format: {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}.
        Extra keyword arguments (tools, date_string, ...) reach the template. With tokenize=True, returns token
        ids of the rendered text (no tokens added: the template writes `<|begin_of_text|>` itself)."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (chat_template.json / tokenizer_config.json)")
        batched = isinstance(messages, (list, tuple)) and len(messages) > 0 and isinstance(messages[0], (list, tuple))
        conversations = messages if batched else [messages]
        prompts = [
            chat_template.render(self.chat_template, c, self.special_tokens, add_generation_prompt, **kwargs)
            for c in conversations
        ]
        if tokenize:
            encoded = [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]
            return encoded if batched else encoded[0]
        return prompts if batched else prompts[0]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Token ids (list or 1-D tensor) -> text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return self.tokenizer.decode_batch([list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    def _with_bos(self, prompt: str) -> str:
        """transformers' `build_string_from_input`."""
        if self.bos_token is None or self.bos_token in prompt:
            return prompt
        n = 0
        while prompt.startswith(self.image_token):
            prompt = prompt[len(self.image_token) :]
            n += 1
        return f"{self.image_token * n}{self.bos_token}{prompt}"

    # ---------------------------------------------------------------------------------------------- call

    def __call__(
        self,
        images: ImageLike | Sequence | None = None,
        text: str | Sequence[str] | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Preprocess a batch of prompts and their images.

        text: one prompt or a list of prompts; `<|image|>` marks where each image goes.
        images: one image, a list (the images of a single prompt, or with several prompts, all images in prompt
            order), or a list of lists (the images of each prompt). An image is a PIL.Image, a path, bytes, a
            numpy HWC uint8 array or a torch CHW uint8 tensor.
        padding: pad prompts to the longest (True / "longest"); with False all prompts must have equal length.
        padding_side: "left" (what generation needs) or "right"; None uses the processor's own (the checkpoint's
            tokenizer_config.json `padding_side`, else "right", as transformers does).

        Returns int64 input_ids / attention_mask (batch, seq); with images, float32 pixel_values
        (batch, max_images, max_tiles, 3, tile, tile), int64 aspect_ratio_ids (batch, max_images),
        aspect_ratio_mask (batch, max_images, max_tiles), num_tiles (batch, max_images) and, with text,
        cross_attention_mask (batch, seq, max_images, max_tiles). Any bad input raises ValueError before
        anything is computed.
        """
        if images is None and text is None:
            raise ValueError("give text, images or both")
        prompts = None
        if text is not None:
            if isinstance(text, str):
                prompts = [text]
            elif isinstance(text, Sequence) and len(text) > 0 and all(isinstance(t, str) for t in text):
                prompts = list(text)
            else:
                raise ValueError("text must be a string or a non-empty list of strings")
            prompts = [self._with_bos(p) for p in prompts]
        nested = self._nest_images(images, prompts)
        if prompts is not None:
            self._check_image_counts(prompts, nested)
        if nested is not None and not any(nested):
            nested = None  # every prompt has zero images
        if prompts is None and nested is None:
            raise ValueError("images is empty and no text was given")
        rgb = None
        if nested is not None:
            rgb = [[load_rgb(im, f"images[{b}][{n}]") for n, im in enumerate(row)] for b, row in enumerate(nested)]

        out = {}
        if prompts is not None:
            out.update(self._tokenize(prompts, padding, padding_side or self.padding_side))
        if rgb is not None:
            out.update(self.image_processor(rgb))
            if prompts is not None:
                out["cross_attention_mask"] = self._cross_attention_mask(out["input_ids"], out["num_tiles"])
        return out

    def _nest_images(self, images, prompts: list[str] | None) -> list[list] | None:
        if images is None:
            return None
        if is_image_like(images):
            return [[images]]
        if not isinstance(images, Sequence):
            raise ValueError(f"images must be an image or a list of images, got {type(images).__name__}")
        images = list(images)
        if all(is_image_like(im) for im in images):  # flat: one prompt's images, or all images in prompt order
            if prompts is None or len(prompts) == 1:
                return [images]
            counts = [p.count(self.image_token) for p in prompts]
            if sum(counts) != len(images):
                raise ValueError(
                    f"{len(prompts)} prompts hold {sum(counts)} {self.image_token} tokens in all ({counts} per "
                    f"prompt) but {len(images)} images were given"
                )
            starts = [sum(counts[:b]) for b in range(len(counts))]
            return [images[s : s + c] for s, c in zip(starts, counts)]
        nested = []
        for b, row in enumerate(images):
            if is_image_like(row) or not isinstance(row, Sequence):
                raise ValueError(f"images mixes single images and lists (entry {b} is {type(row).__name__})")
            for n, im in enumerate(row):
                if not is_image_like(im):
                    raise ValueError(f"images[{b}][{n}] is not an image (got {type(im).__name__})")
            nested.append(list(row))
        return nested

    def _check_image_counts(self, prompts: list[str], nested: list[list] | None) -> None:
        tokens = [p.count(self.image_token) for p in prompts]
        given = [0] * len(prompts) if nested is None else [len(row) for row in nested]
        if len(given) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but images for {len(given)} prompts were given")
        if tokens != given:
            raise ValueError(
                f"the number of {self.image_token} tokens must equal the number of images in every prompt: found "
                f"{tokens} {self.image_token} tokens and {given} images per prompt"
            )

    def _tokenize(self, prompts: list[str], padding: bool | str, side: str) -> dict[str, torch.Tensor]:
        side = _check_padding_side(side)
        ids = [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=True)]
        for b, (p, row) in enumerate(zip(prompts, ids)):
            if row.count(self.image_token_id) != p.count(self.image_token):
                raise ValueError(
                    f"prompt {b}: the tokenizer split {self.image_token} ({p.count(self.image_token)} in the text, "
                    f"{row.count(self.image_token_id)} image tokens after tokenizing)"
                )
        longest = max(len(row) for row in ids)
        if padding not in (True, False, "longest", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'do_not_pad', got {padding!r}")
        if padding in (False, "do_not_pad") or all(len(row) == longest for row in ids):
            if any(len(row) != longest for row in ids):
                lengths = [len(row) for row in ids]
                raise ValueError(f"prompts have different lengths {lengths}; pass padding=True")
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), longest, dtype=torch.int64)}
        if self.pad_token_id is None:
            raise ValueError("prompts need padding but the tokenizer config names no pad_token")
        input_ids = torch.full((len(ids), longest), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros(len(ids), longest, dtype=torch.int64)
        for b, row in enumerate(ids):
            span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
            input_ids[b, span] = torch.tensor(row, dtype=torch.int64)
            attention_mask[b, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _cross_attention_mask(self, input_ids: torch.Tensor, num_tiles: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        max_tiles = self.image_processor.config.max_image_tiles
        mask = torch.zeros(batch, length, num_tiles.shape[1], max_tiles, dtype=torch.int64)
        for b, row in enumerate(input_ids.tolist()):
            for n, (start, end) in enumerate(_image_attention_spans(row, self.image_token_id)):
                mask[b, start:end, n, : num_tiles[b, n]] = 1
        return mask


def _image_attention_spans(ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of the tokens each image attends to (transformers' `get_cross_attention_token_mask`)."""
    locations = [i for i, t in enumerate(ids) if t == image_token_id]
    spans = [[a, b] for a, b in zip(locations, locations[1:] + [len(ids)])]
    last_end = len(ids)
    for span in reversed(spans):  # a run of consecutive image tokens attends to what follows the whole run
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return [tuple(s) for s in spans]


def _check_padding_side(side: str) -> str:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    return side


def _eos_token_ids(directory: Path) -> tuple[int, ...]:
    """Stop tokens: generation_config.json's eos_token_id, else config.json's (text_config first); empty when
    neither file names them (then the tokenizer's eos_token is used)."""
    for source in ("generation_config.json", "config.json"):
        config = chat_template.read_json(directory / source) or {}
        value = (config.get("text_config") or {}).get("eos_token_id", config.get("eos_token_id"))
        if value is not None:
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{directory / source}: eos_token_id must be an int or a list of ints, got {value!r}")
            return tuple(ids)
    return ()
