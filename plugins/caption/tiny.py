"""Build the tiny built-in captioners (``builtin:tiny-captioner``, ``builtin:tiny-florence2``, ``builtin:tiny-vlm``).

Each is a real transformers model class (BLIP, Florence-2, LLaVA) with tiny
sizes, random weights from a fixed seed and a tokenizer built in code (no
downloads).  It is built once into ``builtin_models_dir()/<name>-v1/`` (in a
temporary folder renamed into place, so racing processes are safe) and then
loaded with ``from_pretrained`` by exactly the code that loads a hub id or a
local folder.  Their captions are gibberish made of real characters; they exist
to exercise the plumbing in tests and the quickstart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSION = "v1"
SEED = 5150
WORDS = ("a an the photo picture of cat dog bird red blue green yellow tree house sky cloud person woman man "
         "sitting standing on in with and near is small large old bright dark field street water").split()


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's scheme)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _images(model: str, name: str, **kwargs: Any) -> Any:
    from .modelref import image_processor_class

    return image_processor_class(model, name)(**kwargs)


def _seeded(build: Callable[[], Any]) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


# ---------------------------------------------------------------- BLIP
def _save_blip(out: Path) -> None:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(specials + list(WORDS)) + "\n")
    tok = BertTokenizer(str(vocab_file), do_lower_case=True, bos_token="[DEC]")
    vocab_file.unlink()
    images = _images("blip", "BlipImageProcessor", size={"height": 32, "width": 32})
    proc = BlipProcessor(image_processor=images, tokenizer=tok)
    text = dict(vocab_size=len(specials) + len(WORDS), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128, bos_token_id=5,
                pad_token_id=0, sep_token_id=3, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16, initializer_range=0.5)
    model = _seeded(lambda: BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision,
                                                                     projection_dim=32)))
    model.save_pretrained(out)
    proc.save_pretrained(out)


# ---------------------------------------------------------------- Florence-2
def _save_florence2(out: Path) -> None:
    from transformers import (
        BartConfig,
        BartTokenizer,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in _byte_chars():
        vocab.setdefault(ch, len(vocab))
    tok = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    # 64x64 pixels, total stride 32 -> 2x2 spatial tokens + 1 temporal token
    images = _images("clip", "CLIPImageProcessor", size={"height": 64, "width": 64},
                     crop_size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5)
    proc = Florence2Processor(image_processor=images, tokenizer=tok, post_processor_config={"pure_text": {}})
    vision = Florence2VisionConfig(depths=[1, 1, 1, 1], embed_dim=[8, 8, 16, 16], num_heads=[1, 1, 2, 2],
                                   num_groups=[1, 1, 2, 2], window_size=2, projection_dim=16, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                      max_position_embeddings=512, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_bos_token_id=0, init_std=0.5)
    model = _seeded(lambda: Florence2ForConditionalGeneration(
        Florence2Config(vision_config=vision, text_config=text, image_token_id=tok.image_token_id)))
    _allow_only_letters(model, vocab, eos=2)
    model.save_pretrained(out)
    proc.save_pretrained(out)


def _allow_only_letters(model: Any, vocab: dict[str, int], eos: int) -> None:
    """Make the tiny model's generation config suppress every token but a-z, space (Ġ) and end-of-text."""
    allowed = {vocab[c] for c in "abcdefghijklmnopqrstuvwxyz\u0120"} | {eos}
    model.generation_config.suppress_tokens = [i for i in sorted(vocab.values()) if i not in allowed]


# ---------------------------------------------------------------- LLaVA (generic image-text-to-text)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def _save_vlm(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in _byte_chars():
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                  padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    images = _images("clip", "CLIPImageProcessor", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=16, vision_feature_select_strategy="full",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=16)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, initializer_range=0.5)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                      vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = _seeded(lambda: LlavaForConditionalGeneration(cfg))
    _allow_only_letters(model, vocab, eos=2)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    proc.save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-captioner": _save_blip,
    "tiny-florence2": _save_florence2,
    "tiny-vlm": _save_vlm,
}
BUILTIN_REFS = {f"builtin:{name}": name for name in BUILDERS}


def tiny_captioner_path(name: str) -> Path:
    """The folder of built-in captioner ``name`` (e.g. "tiny-captioner"), built on first use."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny captioner {name!r}; known: {', '.join(BUILDERS)}")
    from fluxkiln.engine.paths import build_once

    from .modelref import quiet_transformers

    def build(folder: Path) -> None:
        with quiet_transformers():
            BUILDERS[name](folder)

    return build_once(f"{name}-{VERSION}", "config.json", build)
