"""OVSegmentor's network and losses (Xu et al., CVPR 2023, seed 004, sec. 3).

Visual encoder (sec. 3.1.1): patch tokens are the frozen backbone's stride-32 feature map (its head, c5 and
the average-pooled c4, concatenated: the stand-in for DINO's ViT patches), projected to D, with a learned
position embedding. K learnable group tokens are appended; Phi_enc^1 (Transformer encoder layers) processes
patches and groups together; the binding module (eq. 3-6) is slot attention normalised over the groups, with
the hard-assignment trick (one-hot forward, the softmax's gradient backward); Phi_enc^2 processes the image
tokens and the bound groups. The paper has 6 + 6 layers; here `layers_before` + `layers_after` (1 + 1 by
default), so that it trains on 2 CPU threads.

Text side (sec. 3.1.2): the frozen packaged MiniLM gives the caption embedding (its pooled sentence
embedding for the [EOT] feature), the masked caption's token states, and the prompted entity embedding;
learned projections map them into the joint 256-d space.

Losses (sec. 3.2): the image-caption contrastive loss (eq. 7), masked entity completion with a one-layer
Transformer decoder over the groups (eq. 8-9), and cross-image mask consistency (eq. 10-12: sub-group
selection, Hungarian matching, Dice against binarised masks of an EMA model).

Inference (eq. 1): each patch's score for a class is sum_k A_jk cos(g_k, t_c), A the binding module's soft
assignment; the arg max over the typed words, background where the best score is under a threshold.
"""

from __future__ import annotations

import copy
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.core.errors import OvsegError

JOINT_DIM = 256  # the paper's joint feature space


@dataclass
class OVSegConfig:
    in_channels: int = 1280 + 320 + 112  # backbone head + c5 + pooled c4
    dim: int = 192  # D
    heads: int = 4
    groups: int = 8  # K
    layers_before: int = 1
    layers_after: int = 1
    text_dim: int = 384  # MiniLM
    pos_grid: int = 12  # the learned position embedding's size (interpolated to other grids)
    hard_assignment: bool = True
    # eq. 4-6 repeated, as slot attention [33] iterates (the last pass hard); 1 is the paper's single pass
    iterations: int = 3
    binding_scale: float | None = 10.0  # cosine logits at temperature 0.1 (None: eq. 4's scaled dot product)


def patch_input(features) -> torch.Tensor:
    """(B, C, h, w) patch features at stride 32 from `BackboneFeatures`: head, c5 and c4 average-pooled by 2."""
    c4 = F.avg_pool2d(features.c4.float(), 2, ceil_mode=True)
    h, w = features.head.shape[-2:]
    c4 = c4[..., :h, :w]
    return torch.cat([features.head.float(), features.c5.float(), c4], dim=1)


def slot_binding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hard: bool,
                 gumbel: bool = False, scale: float | None = None,
                 uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4-5. q (B, K, D) group queries, k, v (B, L, D) patch keys and values. Returns (the updated groups
    (B, K, D), the soft assignment A (B, L, K), normalised over the groups for each patch). With `hard`, the
    assignment used for the update is one-hot forward and carries the softmax's gradient backward. With
    `gumbel` (training), Gumbel noise is added to the logits first, as GroupViT's hard-assignment trick [53]
    does: without it one group claims every patch and the others never learn to bind. `uniform` (B, L, K) in
    (0, 1) gives the noise's uniform draws (the trainer draws them per sample, so that the noise does not
    depend on how a batch is split among processes); by default they are drawn here."""
    if scale is None:
        logits = k @ q.transpose(1, 2) / q.shape[-1] ** 0.5  # (B, L, K)
    else:  # cosine logits at a fixed temperature 1/scale
        logits = scale * F.normalize(k, dim=-1) @ F.normalize(q, dim=-1).transpose(1, 2)
    if gumbel:
        u = (torch.rand_like(logits) if uniform is None else uniform.to(logits)).clamp(1e-9, 1.0 - 1e-9)
        logits = logits - torch.log(-torch.log(u))
    soft = torch.softmax(logits, dim=-1)
    used = soft
    if hard:
        one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        used = one_hot + soft - soft.detach()
    groups = used.transpose(1, 2) @ v / (used.sum(1).unsqueeze(-1) + 1e-6)  # weighted mean of the values
    return groups, soft


def _encoder(dim: int, heads: int, layers: int) -> nn.Module:
    if layers == 0:
        return nn.Identity()
    layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class OVSegNet(nn.Module):
    def __init__(self, config: OVSegConfig | None = None):
        super().__init__()
        c = self.config = config or OVSegConfig()
        self.patch = nn.Sequential(nn.LayerNorm(c.in_channels), nn.Linear(c.in_channels, c.dim))
        self.pos = nn.Parameter(torch.zeros(1, c.dim, c.pos_grid, c.pos_grid))
        # unit scale: tokens at 0.02 are swamped by the first attention layer and the groups start (and stay) alike
        self.group_tokens = nn.Parameter(torch.randn(1, c.groups, c.dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.enc1 = _encoder(c.dim, c.heads, c.layers_before)
        self.norm_g, self.norm_i = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.w_q, self.w_k, self.w_v = (nn.Linear(c.dim, c.dim) for _ in range(3))  # eq. 3
        self.w_o = nn.Linear(c.dim, c.dim)  # eq. 6
        self.enc2 = _encoder(c.dim, c.heads, c.layers_after)
        self.norm_out = nn.LayerNorm(c.dim)
        self.image_proj = nn.Linear(c.dim, JOINT_DIM)  # groups -> joint space
        self.text_proj = nn.Linear(c.text_dim, JOINT_DIM)  # captions, entity prompts, class prompts
        # eq. 8: a projection of the masked caption's tokens queries the groups in one decoder layer
        self.dec_in = nn.Linear(c.text_dim, c.dim)
        self.decoder = nn.TransformerDecoderLayer(c.dim, c.heads, 4 * c.dim, dropout=0.0, batch_first=True,
                                                  norm_first=True)
        self.dec_proj = nn.Linear(c.dim, JOINT_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def forward(self, patches: torch.Tensor, noise: torch.Tensor | None = None) -> dict:
        """patches (B, C, h, w) -> {"groups" (B, K, D), "image" (B, L, D) the output image tokens,
        "assignment" (B, L, K) the soft binding A, "hw" (h, w)}. noise: (B, L, K) uniform draws for the Gumbel
        noise of training (see `slot_binding`)."""
        c = self.config
        b, _, h, w = patches.shape
        x = self.patch(patches.flatten(2).transpose(1, 2))
        pos = F.interpolate(self.pos, size=(h, w), mode="bilinear", align_corners=False) if (h, w) != (
            c.pos_grid, c.pos_grid) else self.pos
        x = x + pos.flatten(2).transpose(1, 2)
        z = self.enc1(torch.cat([x, self.group_tokens.expand(b, -1, -1)], dim=1))
        img, grp = z[:, : h * w], z[:, h * w:]
        ni = self.norm_i(img)
        k, v = self.w_k(ni), self.w_v(ni)
        for it in range(c.iterations):
            last = it == c.iterations - 1
            bound, soft = slot_binding(self.w_q(self.norm_g(grp)), k, v, c.hard_assignment and last,
                                       gumbel=self.training and c.hard_assignment and last, scale=c.binding_scale,
                                       uniform=noise)
            grp = grp + self.w_o(bound)  # eq. 6
        z = self.norm_out(self.enc2(torch.cat([img, grp], dim=1)))
        return {"groups": z[:, h * w:], "image": z[:, : h * w], "assignment": soft, "hw": (h, w)}

    # ------------------------------------------------------------------------------------------ embeddings
    def image_embedding(self, groups: torch.Tensor) -> torch.Tensor:
        """z^I: the mean of the group tokens, projected and normalised (B, 256)."""
        return F.normalize(self.image_proj(groups.mean(1)), dim=-1)

    def group_embeddings(self, groups: torch.Tensor) -> torch.Tensor:
        """Each group in the joint space, normalised (B, K, 256)."""
        return F.normalize(self.image_proj(groups), dim=-1)

    def text_embedding(self, sentence: torch.Tensor) -> torch.Tensor:
        """A frozen sentence embedding (N, 384) in the joint space, normalised (N, 256)."""
        return F.normalize(self.text_proj(sentence), dim=-1)

    def complete(self, masked_tokens: torch.Tensor, token_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Eq. 8: z^M (B, 256), the masked caption's tokens (B, T, 384) after querying the groups, pooled over
        its tokens (MiniLM's sentence embedding is a mean, its stand-in for the [EOT] feature)."""
        out = self.decoder(self.dec_in(masked_tokens), groups, tgt_key_padding_mask=~token_mask.bool())
        m = token_mask.unsqueeze(-1).to(out.dtype)
        return F.normalize(self.dec_proj((out * m).sum(1) / m.sum(1).clamp_min(1.0)), dim=-1)

    def patch_scores(self, out: dict, class_embeddings: torch.Tensor) -> torch.Tensor:
        """Eq. 1 before the arg max: (B, C, h, w) = A . G . T^T with normalised group and class embeddings; A
        is the hard assignment (each patch its group's cosine), as the network bound them."""
        g = self.group_embeddings(out["groups"])  # (B, K, 256)
        a = out["assignment"]
        if self.config.hard_assignment:
            a = F.one_hot(a.argmax(-1), a.shape[-1]).to(a.dtype)
        s = a @ (g @ class_embeddings.T)  # (B, L, C)
        h, w = out["hw"]
        return s.transpose(1, 2).reshape(s.shape[0], -1, h, w)

    def group_masks(self, image: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Eq. 10: sigmoid(I^T G) (B, L, K') of image tokens against (sub)groups, scaled by 1/sqrt(D)."""
        return torch.sigmoid(image @ groups.transpose(1, 2) / image.shape[-1] ** 0.5)

    # ------------------------------------------------------------------------------------------ checkpoint
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        from ovseg.core.cache import atomic_write_bytes

        buf = io.BytesIO()
        state = {k: v.detach().to("cpu", torch.float16) for k, v in self.state_dict().items()}
        torch.save({"config": asdict(self.config), "state": state, "extra": extra or {}}, buf)
        return atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> tuple["OVSegNet", dict]:
        path = Path(path)
        if not path.is_file():
            raise OvsegError(f"no OVSegmentor network at {path}: run `ovseg train ovsegmentor`")
        blob = torch.load(path, map_location="cpu", weights_only=False)
        net = cls(OVSegConfig(**blob["config"]))
        net.load_state_dict({k: v.float() for k, v in blob["state"].items()})
        return net.to(device).eval(), blob.get("extra", {})


# ------------------------------------------------------------------------------------------------ losses

def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 7 / eq. 9: the symmetric InfoNCE between matched rows of a and b (normalised, (N, d)), the
    temperature learned (`logit_scale` = log 1/tau). `valid` (N,) bool keeps only some rows (as anchors and as
    candidates)."""
    if valid is not None:
        a, b = a[valid], b[valid]
    if len(a) < 2:
        return a.sum() * 0.0
    logits = logit_scale.exp().clamp(max=100.0) * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def dice_loss(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """D(m, m_hat) = 1 - 2|m ∩ m_hat| / (|m| + |m_hat|) over the last dimension (soft for m_hat)."""
    inter = (target * pred).sum(-1)
    return 1.0 - 2.0 * inter / (target.sum(-1) + pred.sum(-1)).clamp_min(1e-6)


def hungarian(cost: np.ndarray) -> np.ndarray:
    """Eq. 11: the permutation p (p[k] = the column matched to row k) of least total cost."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return out


def select_subgroups(group_emb: torch.Tensor, entity: torch.Tensor, ratio: float) -> torch.Tensor:
    """The K' = ratio * K groups most similar to the entity embedding: indices (K',) of group_emb (K, 256)."""
    k = max(1, int(round(ratio * group_emb.shape[0])))
    return torch.topk(group_emb @ entity, k).indices


def mask_consistency(online: dict, ema: dict, net: OVSegNet, ema_net: OVSegNet, pairs: list[tuple[int, int]],
                     entities: torch.Tensor, ratio: float = 0.5, delta: float = 0.65) -> torch.Tensor:
    """Eq. 10-12 over pairs (i, j) of batch rows sharing an entity (its prompt embedding in the joint space,
    entities (P, 256)). For image i: the target masks come from the EMA model's own sub-groups
    (sigmoid(I_i G_i^sub), binarised at delta), the prediction from the online model's image tokens against the
    other image's sub-groups (sigmoid(I_i G_j^sub)); matched by the Hungarian algorithm on -cos; Dice loss,
    symmetric over i and j."""
    if not pairs:
        return online["groups"].sum() * 0.0
    g_on = net.group_embeddings(online["groups"])
    with torch.no_grad():
        g_ema = ema_net.group_embeddings(ema["groups"])
    losses = []
    for (i, j), e in zip(pairs, entities):
        sub_on = {r: select_subgroups(g_on[r].detach(), e, ratio) for r in (i, j)}
        sub_ema = {r: select_subgroups(g_ema[r], e, ratio) for r in (i, j)}
        for a, b in ((i, j), (j, i)):
            with torch.no_grad():
                target = ema_net.group_masks(ema["image"][a : a + 1], ema["groups"][a : a + 1, sub_ema[a]])[0].T
                target = (target >= delta).float()  # (K', L)
            pred = net.group_masks(online["image"][a : a + 1], online["groups"][b : b + 1, sub_on[b]])[0].T
            cos = F.normalize(target, dim=-1) @ F.normalize(pred.detach(), dim=-1).T
            p = torch.from_numpy(hungarian(-cos.cpu().numpy())).to(pred.device)
            losses.append(dice_loss(target, pred[p]).mean())
    return 0.5 * torch.stack(losses).sum() / len(pairs)


@torch.no_grad()
def ema_update(ema_net: nn.Module, net: nn.Module, momentum: float = 0.99) -> None:
    """theta_ema <- m theta_ema + (1 - m) theta."""
    for pe, p in zip(ema_net.parameters(), net.parameters()):
        pe.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)
    for be, b in zip(ema_net.buffers(), net.buffers()):
        be.copy_(b)


def make_ema(net: nn.Module) -> nn.Module:
    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema.eval()
