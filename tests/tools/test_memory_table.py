"""tools/memory_table.py: exact parameter counts from config files alone, and the command.

The other half of the proof (the ranks of a 2-rank group report exactly the bytes the
same counting gives for the tiny checkpoint) is in tests/server/test_openai_sdk.py,
which already runs that group.
"""

import torch

from ithaca.runtime.offload import parameter_bytes
from tools import memory_table


def test_counting_on_the_meta_device_matches_a_built_model():
    torch.manual_seed(0)
    config = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
              "num_hidden_layers": 2, "vocab_size": 99, "max_position_embeddings": 16,
              "projection_dim": 8}  # fmt: skip
    meta = memory_table.build_on_meta(
        "transformers", "CLIPTextModelWithProjection", config, "CLIPTextConfig"
    )
    assert all(p.is_meta for p in meta.parameters())
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    real = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    assert (
        memory_table.module_bytes(meta, 4)
        == parameter_bytes([real])
        == 4 * sum(p.numel() for p in real.parameters())
    )
    # T5 keeps its feed-forward output projections in fp32: 4 bytes even in bf16.
    t5 = memory_table.build_on_meta("transformers", "T5EncoderModel",
                                    {"d_model": 16, "d_ff": 24, "d_kv": 4, "num_heads": 4,
                                     "num_layers": 2, "vocab_size": 50}, "T5Config")  # fmt: skip
    wo = sum(p.numel() for n, p in t5.named_parameters() if ".wo." in n)
    total = sum(p.numel() for p in t5.parameters())
    assert memory_table.module_bytes(t5, 2) == 2 * total + 2 * wo


def test_the_command_renders_a_model(capsys):
    assert memory_table.main(["--stdout", "--model", "z_image_turbo"]) == 0
    text = capsys.readouterr().out
    # Z-Image-Turbo's published size: 6.15B transformer, Qwen3-4B text encoder.
    assert "| transformer | 6,154,908,736 | 12.3 |" in text
    assert "| text_encoder | 4,022,468,096 | 8.0 |" in text
    assert text.count("| Ulysses 4 |") == 2  # one row per resolution
