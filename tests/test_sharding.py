"""FSDP pieces that need no process group: which modules become units, what the weight sync
yields, and the settings the trainer refuses (the two-process runs: tests/test_fsdp.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, Qwen2Config

from apo import sharding
from apo import train as T

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1)


def names(model, units):
    index = {id(m): n for n, m in model.named_modules()}
    return [index[id(u)] for u in units]


def test_units_are_the_blocks_and_an_untied_embedding_and_head():
    untied = AutoModelForCausalLM.from_config(Qwen2Config(**SMALL, tie_word_embeddings=False))
    assert names(untied, sharding.units(untied)) == ["model.layers.0", "model.layers.1", "model.embed_tokens",
                                                     "lm_head"]
    # a tied weight stays in the root unit, with the final norm
    tied = AutoModelForCausalLM.from_config(Qwen2Config(**SMALL, tie_word_embeddings=True))
    assert names(tied, sharding.units(tied)) == ["model.layers.0", "model.layers.1"]
    critic = AutoModelForTokenClassification.from_config(Qwen2Config(**SMALL, num_labels=1, tie_word_embeddings=False))
    assert names(critic, sharding.units(critic)) == ["model.layers.0", "model.layers.1", "model.embed_tokens"]


def test_a_model_without_block_classes_is_refused():
    with pytest.raises(ValueError, match="resources.train.distributed: fsdp"):
        sharding.units(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_full_weights_of_a_plain_model_name_every_tensor_in_the_asked_dtype():
    model = AutoModelForCausalLM.from_config(Qwen2Config(**SMALL, tie_word_embeddings=True))
    out = dict(sharding.full_weights(model, torch.bfloat16))
    assert out.keys() == model.state_dict().keys()  # the tied LM head too: vLLM's CPU backend reloads it by name
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    torch.testing.assert_close(out["lm_head.weight"], model.lm_head.weight.detach().to(torch.bfloat16))


@pytest.mark.parametrize("distributed, backend, error, match", [
    ("fsdp", "hf", NotImplementedError, "generation.backend\\) samples from the local module"),
    ("zero3", "vllm", ValueError, "resources.train.distributed: unknown mode 'zero3'"),
])
def test_trainer_refuses_what_fsdp_cannot_run(distributed, backend, error, match):
    with pytest.raises(error, match=match):
        T.check_distributed({"backend": backend}, distributed, world=2)
    T.check_distributed({"backend": backend}, "ddp", world=2)  # the data-parallel path takes either engine


def test_one_process_under_fsdp_shards_nothing_and_takes_either_engine():
    T.check_distributed({"backend": "hf"}, "fsdp", world=1)


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_sharded_state_loads_without_unpickling_code(tmp_path):
    """torch.distributed.checkpoint pickles its `.metadata`; the trainer reads it with an
    unpickler that allows only metadata classes: a saved state loads, a crafted file runs
    nothing."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from apo.sharding import safe_reader

    def net_and_state():
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(net.parameters())
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
        model_state, optim_state = get_state_dict(net, opt)
        return net, {"model": model_state, "optimizer": optim_state}

    saved, state = net_and_state()
    dcp.save(state, checkpoint_id=str(tmp_path / "policy"))
    _, loaded = net_and_state()
    dcp.load(loaded, storage_reader=safe_reader(tmp_path / "policy"))
    assert torch.equal(loaded["model"]["weight"], saved.weight.detach())
    marker = tmp_path / "code-ran"
    (tmp_path / "policy" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(CheckpointException, match="io.open is not part of checkpoint metadata"):
        dcp.load(loaded, storage_reader=safe_reader(tmp_path / "policy"))
    assert not marker.exists()
