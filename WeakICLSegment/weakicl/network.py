"""The WS-ICL network: a shared image encoder, a task encoder whose embedding does not depend on the
target, and a prompt-aware decoder.

Why this split: the task embedding (a few tokens per class) is computed once from the reference images
and their weak prompts or masks, then reused for every target patch, every volume of a study and every
correction. Target prompts (box, interpolated box hull, points, previous mask) enter only the decoder, so
one network does context-only segmentation, in-volume propagation and interactive correction.
Tensors are [batch, channel, k, j, i].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetResBlock
from torch import nn

from .prompts import FOREGROUND_CHANNELS, MASK_CHANNEL, PROMPT_CHANNELS

NORM = ("instance", {"affine": True})
HULL_CHANNEL = PROMPT_CHANNELS.index("box_hull")


@dataclass
class NetConfig:
    """Every architectural choice, stored in the model card so weights rebuild their network."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    query_tokens: int = 8
    attention_heads: int = 4
    task_layers: int = 2
    prompt_channels: int = len(PROMPT_CHANNELS)
    patch_size: tuple[int, int, int] = (64, 64, 64)
    working_spacing_mm: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.channels) < 2 or min(self.channels) < 4:
            raise ValueError(f"channels needs at least two levels of >= 4 features, got {self.channels}")
        if self.channels[-1] % self.attention_heads:
            raise ValueError("the deepest channel count must be divisible by attention_heads")
        if self.query_tokens < 0 or self.task_layers < 1:
            raise ValueError("query_tokens must be >= 0 and task_layers >= 1")
        factor = 2 ** (len(self.channels) - 1)
        if any(p % factor for p in self.patch_size):
            raise ValueError(f"patch_size must be divisible by {factor}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class ImageEncoder(nn.Module):
    """Residual U-Net encoder shared by references and targets (image only, so target features are cacheable)."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        levels, previous = [], 1
        for level, width in enumerate(channels):
            stride = 1 if level == 0 else 2
            levels.append(nn.Sequential(
                UnetResBlock(3, previous, width, 3, stride, NORM),
                UnetResBlock(3, width, width, 3, 1, NORM),
            ))
            previous = width
        self.levels = nn.ModuleList(levels)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], image
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


def prompt_pyramid(prompts: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Prompt channels at every encoder resolution (max pooling keeps thin boxes and small points)."""
    pyramid = [prompts]
    for _ in range(levels - 1):
        pyramid.append(F.max_pool3d(pyramid[-1], 2))
    return pyramid


def foreground_weight(prompts: torch.Tensor) -> torch.Tensor:
    """Where the prompts say the structure is: the maximum of box, hull, positive points and mask."""
    return prompts[:, FOREGROUND_CHANNELS].amax(dim=1, keepdim=True)


class TokenLayer(nn.Module):
    """Tokens attend to memory, then to each other (pre-norm transformer decoder layer)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(4))

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        memory = self.norms[0](memory)
        query = self.norms[1](tokens)
        tokens = tokens + self.cross(query, memory, memory, need_weights=False)[0]
        query = self.norms[2](tokens)
        tokens = tokens + self.self_attention(query, query, query, need_weights=False)[0]
        return tokens + self.mlp(self.norms[3](tokens))


class TaskEncoder(nn.Module):
    """Reference features + reference prompts -> task tokens: [foreground, background, queries...].

    Foreground/background tokens are prompt-weighted averages of the deepest features (Iris' masked
    average token, with the weak-prompt weight in place of the mask); learnable query tokens then attend
    to prompt-aware features of the two deepest levels.
    """

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        width, shallow = config.channels[-1], config.channels[-2]
        self.deep_context = nn.Conv3d(width + config.prompt_channels, width, 1)
        self.shallow_context = nn.Conv3d(shallow + config.prompt_channels, width, 1)
        self.queries = nn.Parameter(torch.randn(config.query_tokens, width) * 0.02)
        self.kind = nn.Parameter(torch.randn(2, width) * 0.02)
        self.layers = nn.ModuleList(TokenLayer(width, config.attention_heads) for _ in range(config.task_layers))

    def forward(self, features: list[torch.Tensor], prompts: torch.Tensor) -> torch.Tensor:
        pyramid = prompt_pyramid(prompts, len(features))
        deep = self.deep_context(torch.cat([features[-1], pyramid[-1]], dim=1))
        shallow = self.shallow_context(torch.cat([features[-2], pyramid[-2]], dim=1))
        weight = foreground_weight(pyramid[-1])
        foreground = weighted_mean(deep, weight)
        background = weighted_mean(deep, 1.0 - weight)
        batch = deep.shape[0]
        tokens = torch.cat([
            torch.stack([foreground, background], dim=1) + self.kind,
            self.queries.expand(batch, -1, -1),
        ], dim=1)
        memory = torch.cat([deep.flatten(2), shallow.flatten(2)], dim=2).transpose(1, 2)
        for layer in self.layers:
            tokens = layer(tokens, memory)
        return tokens


def weighted_mean(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Average feature vector under a soft weight map: [B,C,...] x [B,1,...] -> [B,C]."""
    total = weight.flatten(2).sum(-1).clamp_min(1e-3)
    return (features * weight).flatten(2).sum(-1) / total


class Decoder(nn.Module):
    """U-Net decoder conditioned on task tokens (cross-attention, prototype similarity, FiLM) and on
    target prompt channels added at every resolution."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        channels, width = config.channels, config.channels[-1]
        self.prompt_in = nn.ModuleList(nn.Conv3d(config.prompt_channels, c, 3, padding=1) for c in channels)
        self.bottleneck_attention = nn.MultiheadAttention(width, config.attention_heads, batch_first=True)
        self.bottleneck_norm = nn.LayerNorm(width)
        self.bottleneck = UnetResBlock(3, width + 2, width, 3, 1, NORM)
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.film = nn.ModuleList()
        for level in range(len(channels) - 2, -1, -1):
            self.up.append(nn.ConvTranspose3d(channels[level + 1], channels[level], 2, stride=2))
            self.fuse.append(UnetResBlock(3, 2 * channels[level], channels[level], 3, 1, NORM))
            self.film.append(nn.Linear(width, 2 * channels[level]))
        self.head = nn.Conv3d(channels[0], 1, 1)
        # The box hull and a previous mask are strong priors: start from them, let the network correct.
        self.prior_weight = nn.Parameter(torch.tensor([4.0, 4.0]))
        nn.init.constant_(self.head.bias, -2.0)

    def forward(self, features: list[torch.Tensor], tokens: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        """`prompts` None stands for all-zero prompt channels (a whole volume without prompts or priors):
        the same logits without convolving zeros at every level."""
        pyramid = None if prompts is None else prompt_pyramid(prompts, len(features))

        def with_prompts(level: int) -> torch.Tensor:
            if pyramid is None:  # a convolution of zeros is its bias
                return features[level] + self.prompt_in[level].bias.to(features[level].dtype)[None, :, None, None, None]
            return features[level] + self.prompt_in[level](pyramid[level])

        x = with_prompts(len(features) - 1)
        x = x + self._attend(x, tokens)
        x = self.bottleneck(torch.cat([x, prototype_similarity(x, tokens)], dim=1))
        summary = tokens.mean(dim=1)
        for step, (up, fuse, film) in enumerate(zip(self.up, self.fuse, self.film)):
            level = len(features) - 2 - step
            skip = with_prompts(level)
            x = fuse(torch.cat([up(x), skip], dim=1))
            scale, shift = film(summary).chunk(2, dim=1)
            x = x * (1 + scale[..., None, None, None]) + shift[..., None, None, None]
        if prompts is None:
            return self.head(x)
        priors = prompts[:, [HULL_CHANNEL, MASK_CHANNEL]]
        return self.head(x) + (priors * self.prior_weight[None, :, None, None, None]).sum(dim=1, keepdim=True)

    def _attend(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        batch, width = x.shape[:2]
        query = self.bottleneck_norm(x.flatten(2).transpose(1, 2))
        attended = self.bottleneck_attention(query, tokens, tokens, need_weights=False)[0]
        return attended.transpose(1, 2).reshape(batch, width, *x.shape[2:])


def prototype_similarity(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every voxel to the foreground and background tokens (2 channels)."""
    prototypes = F.normalize(tokens[:, :2], dim=-1)
    voxels = F.normalize(x.flatten(2), dim=1)
    return torch.einsum("btc,bcn->btn", prototypes, voxels).reshape(x.shape[0], 2, *x.shape[2:])


def prefer_onednn_convolutions(model: nn.Module) -> int:
    """Run `model`'s 3D convolutions with spatial kernels through oneDNN on the CPU, in place; returns how
    many. Why: for a batch of one PyTorch picks its slow native kernel whenever batch x channels x depth x
    height is at most 20,480 (a heuristic for small 2D inputs), so most of this network's levels ran there
    (a 48³ frame: 26 of 37 convolutions); oneDNN gives the same values to float rounding. 1x1x1
    convolutions keep PyTorch's choice (oneDNN's reorders cost more than they compute)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv3d) and max(module.kernel_size) > 1 and not isinstance(module.padding, str) \
                and module.padding_mode == "zeros":
            module.forward = _onednn_forward.__get__(module)
            count += 1
    return count


def _onednn_forward(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
        return nn.Conv3d.forward(self, x)
    return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)


class WeakICLNet(nn.Module):
    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        self.image_encoder = ImageEncoder(self.config.channels)
        self.task_encoder = TaskEncoder(self.config)
        self.decoder = Decoder(self.config)

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.image_encoder(image)

    def encode_task(self, features: list[torch.Tensor], prompts: torch.Tensor) -> torch.Tensor:
        """Task tokens [B, T, E] for B references (average them for one class)."""
        return self.task_encoder(features, prompts)

    def decode(self, features: list[torch.Tensor], tokens: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        """Logits [N, 1, ...] for N classes; features may have batch 1 and are shared by the classes;
        `prompts` None: no prompts anywhere."""
        classes = tokens.shape[0]
        if features[0].shape[0] != classes:
            features = [f.expand(classes, *f.shape[1:]) for f in features]
        return self.decoder(features, tokens, prompts)

    def forward(self, ref_image: torch.Tensor, ref_prompts: torch.Tensor, target_image: torch.Tensor, target_prompts: torch.Tensor) -> torch.Tensor:
        """Training pass: ref [B,R,1,...] / [B,R,5,...] references per episode, target [B,1,...] / [B,5,...]."""
        batch, references = ref_image.shape[:2]
        ref_features = self.encode_image(ref_image.flatten(0, 1))
        tokens = self.encode_task(ref_features, ref_prompts.flatten(0, 1))
        tokens = tokens.reshape(batch, references, *tokens.shape[1:]).mean(dim=1)
        return self.decoder(self.encode_image(target_image), tokens, target_prompts)
