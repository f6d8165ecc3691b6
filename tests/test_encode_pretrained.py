"""Pretrained loaders with small local artifacts: a T5 encoder (tiny config + a Unigram tokenizer built
here, saved as a hub checkpoint would be) against a direct transformers call, and a latent cache encoded
with an sd-vae-ft-mse-layout AutoencoderKL and a CLIP text encoder chosen by path."""
from __future__ import annotations

import string
from pathlib import Path

import torch

from ldm.data.latent_cache import LatentDataset
from ldm.stages.encode import encode_latents
from ldm.text import load_text_encoder
from test_latents import CAPTIONS, _sd_like_vae, _tiny_clip, shapes, to_unit, write_prepared


def _tiny_t5(d: Path) -> None:
    """T5EncoderModel from a tiny config + a SentencePiece-style Unigram tokenizer (T5's "</s>" appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    chars = string.ascii_letters + string.digits
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    pieces += [("▁" + w, -1.0) for w in "a red blue green yellow square circle triangle two on next to".split()]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0)
    tokenizer.save_pretrained(d)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(d)


def test_t5_text_encoder_matches_direct_call(tmp_path):
    from transformers import AutoTokenizer, T5EncoderModel

    _tiny_t5(tmp_path / "t5")
    te = load_text_encoder(str(tmp_path / "t5"), max_length=12)
    assert te.kind == "t5" and te.dim == 32 and te.max_length == 12
    caps = ["a red square", "", "two blue circles on a green square next to a yellow triangle"]
    states, lengths = te.encode(caps)
    tok = AutoTokenizer.from_pretrained(tmp_path / "t5")
    enc = tok(caps, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        want = T5EncoderModel.from_pretrained(tmp_path / "t5")(**enc).last_hidden_state
    # "a red square</s>" = 4 tokens, "" = "</s>" alone, the long caption truncated at 12.
    assert lengths.tolist() == enc["attention_mask"].sum(1).tolist() == [4, 1, 12] and states.shape == (3, 12, 32)
    assert enc["input_ids"][0, 3] == 1 and enc["input_ids"][1, 0] == 1
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(states[i, :n], want[i, :n])
        assert not states[i, n:].any()


def test_cache_with_sd_layout_vae_and_clip(tmp_path):
    vae = _sd_like_vae()
    vae.save_pretrained(tmp_path / "sd-vae", safe_serialization=True)
    _tiny_clip(tmp_path / "clip")
    images = shapes(5, 32, seed=7)
    prep = write_prepared(tmp_path / "prepared", images)
    m = encode_latents(tmp_path / "prepared", str(tmp_path / "sd-vae"), tmp_path / "lat",
                       text_encoder=str(tmp_path / "clip"), max_text_length=16, batch_size=4, shard_size=3)
    # SD VAEs carry no shift factor: the manifest records 0; factor 8 -> 4 x 4 latents at 32 px.
    assert m["scaling_factor"] == 0.18215 and m["shift_factor"] == 0.0 and m["latent_shape"] == [4, 4, 4]
    assert m["text_encoder"] == {"name": str(tmp_path / "clip"), "dim": 32, "max_length": 16}
    t = LatentDataset(tmp_path / "lat").tensors()
    with torch.no_grad():
        post = vae.eval().encode(to_unit(images)).latent_dist
    torch.testing.assert_close(t["mean"].float(), post.mean, atol=1e-3, rtol=1e-3)
    te = load_text_encoder(str(tmp_path / "clip"), max_length=16)
    states, lengths = te.encode([r["caption"] for r in prep["rows"]])
    assert t["text_emb"].shape == (5, 16, 32) and torch.equal(t["text_len"], lengths)
    torch.testing.assert_close(t["text_emb"].float(), states, atol=2e-3, rtol=1e-3)
    assert [r["caption"] for r in prep["rows"]] == CAPTIONS[:5]
