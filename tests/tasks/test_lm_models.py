"""tasks/lm/models.py without the module teacher of tests/tasks/test_lm.py: a GGUF
teacher's tokenizer and config converted once, teacher-layer students from a small
safetensors teacher, their config check."""

from __future__ import annotations

import pytest
import torch

from tests.support import LM_SMALL as SMALL
from tests.support import compose_config


def test_a_gguf_teachers_tokenizer_and_config_are_converted_once(tmp_path, monkeypatch, caplog):
    """The GGUF metadata is parsed into Hugging Face JSON files once (keyed by the file's
    hash and the transformers version) and read from there after: the same tokenizer (its
    full serialized form, chat template, special tokens). Where the folder cannot be
    written, the GGUF file is read as before, with a warning."""
    import transformers

    from pipeline.tasks.lm.models import load_tokenizer, tokenizer_hash

    cfg = compose_config("task=lm").teacher
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
