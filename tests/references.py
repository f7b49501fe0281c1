"""Pure-torch references shared by the CPU and CUDA kernel tests."""
import torch


def attention_ref(q, k, v, additive):
    """q [B, H, D]; k, v [B, Hkv, S, D]; additive [B, S] -> [B, H, D] in float64."""
    B, H, D = q.shape
    G = H // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), k) / D ** 0.5 + additive.double()[:, None]
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v)
