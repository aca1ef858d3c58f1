"""tasks/lm/models.py without the module teacher of tests/tasks/test_lm.py: a GGUF
teacher's tokenizer and config converted once, a GGUF file's weights converted as
transformers loads them, teacher-layer students from a small safetensors teacher, their
config check."""

from __future__ import annotations

import pytest
import torch

from tests.support import LM_SMALL as SMALL
from tests.support import compose_config


def test_a_gguf_teachers_tokenizer_and_config_are_converted_once(tmp_path, monkeypatch, caplog):
    """The GGUF metadata is parsed into Hugging Face JSON files once (keyed by the file's
    hash and the transformers version) and read from there after: the same tokenizer (its
    full serialized form, chat template, special tokens) and config. Where the folder cannot
    be written, the GGUF file is read as before, with a warning. On a small GGUF file with a
    byte-level BPE tokenizer (the built-in teacher's conversion runs in the session's LM
    fixtures)."""
    import transformers

    from pipeline.tasks.lm.models import load_tokenizer, teacher_config, tokenizer_hash

    tiny_gguf(tmp_path / "teacher" / "tiny.gguf", tied=True, tokenizer=True)
    cfg = compose_config("task=lm", f"teacher.path={tmp_path / 'teacher'}", "teacher.gguf_file=tiny.gguf").teacher
    calls = []
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append("gguf" if "gguf_file" in kwargs else "json")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(spy))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    direct = load_tokenizer(cfg, str(blocked))  # nowhere to keep it: read from the GGUF file
    assert calls == ["gguf"] and "could not keep" in caplog.text
    assert len(direct) == len(TOKENS) and direct.chat_template == CHAT_TEMPLATE
    assert direct.decode(direct("the thin theme").input_ids) == "the thin theme"
    home = str(tmp_path / "home")
    monkeypatch.setenv("KD_CACHE_HOME", home)  # paths.conversions' default, read when the config is composed
    assert compose_config("task=lm").paths.conversions == home
    calls.clear()
    first = load_tokenizer(cfg, home)
    assert calls == ["gguf", "json"]  # converted, then read as JSON
    (folder,) = (tmp_path / "home" / "gguf").iterdir()
    assert folder.name.endswith(f"-transformers-{transformers.__version__}") and (folder / "config.json").is_file()
    calls.clear()
    again = load_tokenizer(cfg, home)
    assert calls == ["json"]
    for tok in (first, again):
        assert tokenizer_hash(tok) == tokenizer_hash(direct)
        assert tok.chat_template == direct.chat_template and tok.all_special_tokens == direct.all_special_tokens
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (
            direct.pad_token_id, direct.eos_token_id, direct.bos_token_id)
    kept, read = (teacher_config(cfg, where).to_dict() for where in (home, str(blocked)))
    assert kept.pop("_name_or_path") != read.pop("_name_or_path") and kept == read


# a byte-level BPE vocabulary: the 256 bytes as GPT-2 spells them, a few merges, ChatML's specials
MERGES = ["t h", "th e", "Ġ th", "Ġth e", "Ġth i", "Ġthi n", "m e", "Ġthe me"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# GPT-2's spelling of the 256 bytes: the printable ones as themselves, the others from U+0100 on
PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
BYTES = [chr(b) for b in PRINTABLE] + [chr(256 + i) for i in range(256 - len(PRINTABLE))]
TOKENS = [*SPECIALS, *BYTES, *("".join(m.split()) for m in MERGES)]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_gguf(path, tied: bool, tokenizer: bool = False) -> None:
    """A 2-layer Llama as a GGUF file (llama.cpp's tensor names, most tensors Q8_0): random
    values; with ``tied`` no output matrix (the embeddings are the head); with ``tokenizer``
    a byte-level BPE tokenizer (TOKENS, MERGES, a chat template), else none."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    layers, d, ff, heads, kv, vocab = 2, 64, 96, 4, 2, len(TOKENS) if tokenizer else 128
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(TOKENS)
        w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(TOKENS) - len(SPECIALS)))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_chat_template(CHAT_TEMPLATE)
    for add, value in ((w.add_context_length, 64), (w.add_embedding_length, d), (w.add_block_count, layers),
                       (w.add_feed_forward_length, ff), (w.add_head_count, heads), (w.add_head_count_kv, kv),
                       (w.add_rope_dimension_count, d // heads), (w.add_layer_norm_rms_eps, 1e-5),
                       (w.add_vocab_size, vocab)):
        add(value)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def tensor(name, shape, quantized=True):
        a = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8) if quantized else w.add_tensor(name, a)

    tensor("token_embd.weight", (vocab, d))
    tensor("output_norm.weight", (d,), quantized=False)
    if not tied:
        tensor("output.weight", (vocab, d))
    for i in range(layers):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (kv * d // heads, d)), ("attn_v", (kv * d // heads, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            tensor(f"blk.{i}.{name}.weight", shape)
        tensor(f"blk.{i}.attn_norm.weight", (d,), quantized=False)
        tensor(f"blk.{i}.ffn_norm.weight", (d,), quantized=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_a_gguf_files_weights_convert_to_what_transformers_loads(tmp_path, tied):
    """gguf_state_dict (one read of the file, every tensor dequantized by name) equals
    transformers' own full load of the GGUF file, tensor by tensor, exactly (Q8_0 and float
    tensors; Llama's q/k permutation undone), tied tensors once, under their first name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.tasks.lm.models import gguf_state_dict

    tiny_gguf(tmp_path / "tiny.gguf", tied)
    config = AutoConfig.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert config.tie_word_embeddings == tied
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32,
                                                     config=config).state_dict()
    got = gguf_state_dict(tmp_path / "tiny.gguf", config)
    assert set(got) == set(reference) - ({"lm_head.weight"} if tied else set())
    for name, value in got.items():
        assert value.dtype == torch.float32 and torch.equal(value, reference[name]), name


def test_a_teacher_layer_student_is_the_teachers_tensors_for_the_chosen_layers(tmp_path):
    """student.init=teacher_layers from a safetensors teacher (a tiny Llama of 4 layers): the
    student's tensors are the teacher's (layers in the order listed); with every layer it
    computes the teacher's logits; a bad layer list names the teacher's range."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tasks.lm.models import teacher_layer_student

    folder = tmp_path / "teacher"
    torch.manual_seed(3)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    tiny.save_pretrained(folder)
    cfg = compose_config(*SMALL, "teacher=hf_causal_lm", f"teacher.path={folder}").teacher
    student = teacher_layer_student(cfg, [3, 1])
    assert student.config.num_hidden_layers == 2
    full = tiny.state_dict()
    for name, value in student.state_dict().items():
        assert torch.equal(value, full[name.replace("layers.0.", "layers.3.")]), name  # layers.1 stays layers.1
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(teacher_layer_student(cfg, [0, 1, 2, 3])(input_ids=ids).logits, tiny(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"distinct indices of the teacher's 4 layers \(0..3\)"):
        teacher_layer_student(cfg, [0, 4])


def test_teacher_layers_without_layers_is_refused():
    from pipeline.tasks import validate

    with pytest.raises(ValueError, match=r"init=teacher_layers takes the teacher's layers"):
        validate(compose_config(*SMALL, "student=teacher_layers", "student.teacher_layers.layers=[]"))
