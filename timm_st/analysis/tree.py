"""Prefix-tree evaluation: run many sub-networks on a batch, computing every shared prefix once.

Ordered sub-networks share prefixes: the depth-k output of a stage is the depth-(k-1) output plus
one block, and every sub-network with the same stage-1..s depths shares everything up to stage s.
A `PrefixTree` holds one node per distinct prefix (input size, stem, stage entries, blocks, head);
`TreeRunner` walks it depth-first per batch, so each node runs once per batch whatever the number
of sub-networks below it. It keeps only activations along the current path, and visits the child
that continues a stage last (after freeing its parent's output), so for an ordered space it holds
about one activation per stage, not one per block.

To run pieces of a model, a family registers a `TreeSplit` beside its sub-network adapter; families
without one are evaluated one sub-network at a time (`tree_supported` says why).

BatchNorm re-estimation: in train-mode BN the activations along a path do not depend on running
statistics, so one tree pass over the calibration images accumulates every node's own statistics
(a block's statistics depend on its whole prefix, so they belong to tree nodes, not to blocks).
The norm layers' buffers are swapped per node by forward pre-hooks; the model's own buffers are
never written. Every node keeps its statistics until the evaluation pass is done: a mean and a
variance per channel of the norms it runs (a few MiB for ResNet-50's 216-member default space).
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm.utils.model import unwrap_model

from ..method.adapters import _ADAPTERS, Stage, subnet_stages
from ..method.backends import eager_blocks
from ..method.batchnorm import _stat_norms, cumulative_momentum
from ..method.plan import resize_input

__all__ = [
    'TreeSplit', 'register_tree_split', 'tree_split', 'tree_supported', 'Route', 'PrefixTree', 'TreeRunner',
    'recalibrated_statistics', 'calibration_mode', 'fresh_statistics', 'calibration_batches',
]

Blocks = Tuple[Tuple[int, ...], ...]
Route = Tuple[Blocks, Optional[int]]
"""A network to run: the block indices of every stage in the order they run, and the input size
(None: the batch as it is). An ordered `SubnetPlan` gives `(plan.blocks, plan.input_size)`."""

_STAT_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')
# images each sub-network's BatchNorm statistics are re-estimated on by default (the authors use about 2,000)
CALIB_IMAGES = 2000


@dataclass(frozen=True)
class TreeSplit:
    """A model cut into the pieces its forward runs in order.

    `stem(x)` maps the input to the input of stage 0; `enter[s](x)` (None or absent: identity)
    runs what comes between stage s-1's last block and stage s's first block; the blocks are the
    children of the adapter's stage containers; `head(x)` maps the last block's output to logits.
    """

    stem: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    enter: Optional[Tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], ...]] = None


SplitFn = Callable[[nn.Module], TreeSplit]
_SPLITS: Dict[type, SplitFn] = {}


def register_tree_split(model_cls: type, fn: Optional[SplitFn] = None):
    """Register `fn(model) -> TreeSplit` for `model_cls` and its subclasses (usable as a decorator).

    The split must cut the model where its sub-network adapter's stage containers sit; every tree
    evaluation checks once that the full network through the split equals `model(x)`.
    """
    def _register(f: SplitFn) -> SplitFn:
        _SPLITS[model_cls] = f
        return f
    return _register(fn) if fn is not None else _register


def _split_fn(model: nn.Module) -> Tuple[Optional[SplitFn], str]:
    """The split for `model`'s class, only if it is registered at least as specifically as its adapter."""
    for cls in type(model).__mro__:
        if cls in _SPLITS:
            return _SPLITS[cls], f'tree split registered for {cls.__name__}'
        if cls in _ADAPTERS:
            return None, (f'no tree split for {type(model).__name__} (its sub-network adapter is registered for '
                          f'{cls.__name__}); register one with timm_st.analysis.tree.register_tree_split')
    return None, f'no sub-network adapter for {type(model).__name__}'


def tree_split(model: nn.Module) -> Optional[TreeSplit]:
    """The `TreeSplit` of `model` (wrappers looked through), or None."""
    model = unwrap_model(model)
    fn, _ = _split_fn(model)
    return fn(model) if fn is not None else None


def tree_supported(model: nn.Module) -> Tuple[bool, str]:
    """Whether `model` can be evaluated as a prefix tree, and why (a line fit for a log or a report)."""
    fn, reason = _split_fn(unwrap_model(model))
    return fn is not None, reason


class _Node:
    __slots__ = ('token', 'children', 'route_ids', 'stats')

    def __init__(self, token):
        self.token = token
        self.children: Dict[tuple, '_Node'] = {}
        self.route_ids: List[int] = []  # routes whose head is this node
        self.stats: Dict[nn.Module, Dict[str, torch.Tensor]] = {}  # this node's own norm statistics


def _tokens(route: Route) -> Iterator[tuple]:
    blocks, size = route
    yield ('size', size)
    yield ('stem',)
    for s, kept in enumerate(blocks):
        yield ('enter', s)
        for b in kept:
            yield ('block', s, b)
    yield ('head',)


class PrefixTree:
    """The trie of a list of routes: one node per distinct prefix, leaves (head nodes) name their routes."""

    def __init__(self, routes: Sequence[Route]):
        self.routes = [(tuple(tuple(k) for k in blocks), size) for blocks, size in routes]
        self.root = _Node(None)
        for i, route in enumerate(self.routes):
            node = self.root
            for token in _tokens(route):
                node = node.children.setdefault(token, _Node(token))
            node.route_ids.append(i)
        for node in self.nodes():  # continue a stage last: its parent's activation is freed before the long chain
            node.children = dict(sorted(node.children.items(), key=lambda item: item[0][0] == 'block'))

    def nodes(self) -> Iterator[_Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def path(self, i: int) -> List[_Node]:
        """The nodes route `i` runs through, in order."""
        node, out = self.root, []
        for token in _tokens(self.routes[i]):
            node = node.children[token]
            out.append(node)
        return out

    def block_evaluations(self) -> Tuple[int, int]:
        """(block runs per batch through the tree, block runs per batch one route at a time)."""
        tree = sum(1 for n in self.nodes() if n.token[0] == 'block')
        each = sum(sum(len(k) for k in blocks) for blocks, _ in self.routes)
        return tree, each


class TreeRunner:
    """Runs a `PrefixTree` on batches through a model's `TreeSplit`."""

    def __init__(self, model: nn.Module, split: TreeSplit, stages: Sequence[Stage], tree: PrefixTree):
        self.model, self.split, self.tree = model, split, tree
        self.blocks = [list(stage.container._modules.values()) for stage in stages]
        self.enter = tuple(split.enter) if split.enter is not None else (None,) * len(stages)
        if len(self.enter) != len(stages):
            raise ValueError(f'TreeSplit has {len(self.enter)} stage entries but the model has {len(stages)} stages')
        self.current: Optional[_Node] = None  # the node whose piece is running (read by the statistics hooks)

    def _apply(self, node: _Node, x: torch.Tensor) -> torch.Tensor:
        self.current = node
        kind = node.token[0]
        if kind == 'block':
            return self.blocks[node.token[1]][node.token[2]](x)
        if kind == 'enter':
            fn = self.enter[node.token[1]]
            return x if fn is None else fn(x)
        if kind == 'stem':
            return self.split.stem(x)
        if kind == 'head':
            return self.split.head(x)
        return resize_input(x, node.token[1])

    def run(self, x: torch.Tensor, on_leaf: Optional[Callable[[List[int], torch.Tensor], None]] = None) -> None:
        """Depth-first over the tree on batch `x`; `on_leaf(route_ids, logits)` at every head."""
        self._visit(self.tree.root, [x], on_leaf)
        self.current = None

    def _visit(self, node: _Node, box: list, on_leaf) -> None:
        x = box.pop()  # hold the activation only in this frame, so it is freed once the last child has it
        if node.route_ids and on_leaf is not None:
            on_leaf(node.route_ids, x)
        children = list(node.children.values())
        for i, child in enumerate(children):
            out = [self._apply(child, x)]
            if i == len(children) - 1:
                x = None
            self._visit(child, out, on_leaf)

    def run_route(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of route `i` alone, through the split (used to check the split against the model)."""
        for node in self.tree.path(i):
            x = self._apply(node, x)
        self.current = None
        return x

    @contextmanager
    def node_statistics(self, create: bool) -> Iterator[None]:
        """Within the block, every norm layer with running statistics uses the statistics of the node
        being run (`create`: start missing ones as `reset_running_stats` does, for calibration).
        The norms' own buffers are put back on exit, also on error."""
        norms = _stat_norms(self.model)
        originals = [(m, {k: m._buffers[k] for k in _STAT_BUFFERS}) for m in norms]

        def hook(module, args):
            node = self.current
            stats = node.stats.get(module)
            if stats is None:
                if not create:
                    raise RuntimeError(f'prefix tree: no calibrated statistics for a norm layer in {node.token}')
                stats = node.stats[module] = fresh_statistics(module)
            module._buffers.update(stats)

        handles = [m.register_forward_pre_hook(hook) for m in norms]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for m, buffers in originals:
                m._buffers.update(buffers)

    def calibrate(self, batches: Iterable[torch.Tensor], autocast: Callable[[], ContextManager] = nullcontext,
                  after_batch: Optional[Callable[[], None]] = None) -> None:
        """Accumulate every node's own norm statistics over `batches` (one tree pass per batch)."""
        with calibration_mode(self.model) as norms, self.node_statistics(create=True):
            for k, x in enumerate(batches):  # every node sees every batch once: k batches before this one
                cumulative_momentum(norms, k)
                with autocast():
                    self.run(x)
                if after_batch is not None:
                    after_batch()

    def route_statistics(self, i: int) -> Dict[nn.Module, Dict[str, torch.Tensor]]:
        """The norm statistics route `i` was calibrated with, per norm layer it runs."""
        out = {}
        for node in self.tree.path(i):
            out.update(node.stats)
        return out


@torch.no_grad()
def recalibrated_statistics(model: nn.Module, routes: Sequence[Route], calib_loader: Iterable, device: torch.device,
                            calib_images: int = CALIB_IMAGES, autocast: Callable[[], ContextManager] = nullcontext,
                            channels_last: bool = False) -> List[Dict[str, Dict[str, torch.Tensor]]]:
    """The BatchNorm statistics each route gets from one tree calibration pass, per norm layer it runs
    (by qualified name): what `evaluate_plans(bn='recalibrate')` evaluates it with."""
    model = unwrap_model(model)
    split = tree_split(model)
    if split is None:
        raise ValueError(tree_supported(model)[1])
    runner = TreeRunner(model, split, subnet_stages(model), PrefixTree(routes))
    runner.calibrate(calibration_batches(calib_loader, calib_images, device, channels_last), autocast)
    names = {m: n for n, m in model.named_modules()}
    return [{names[m]: stats for m, stats in runner.route_statistics(i).items()} for i in range(len(routes))]


def fresh_statistics(module: nn.Module) -> Dict[str, torch.Tensor]:
    """New statistics for a norm layer, as `reset_running_stats` leaves them."""
    return {'running_mean': torch.zeros_like(module.running_mean), 'running_var': torch.ones_like(module.running_var),
            'num_batches_tracked': torch.zeros_like(module.num_batches_tracked)}


@contextmanager
def _all_modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's own train/eval flag on exit (`model.train(mode)` would make them all alike)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[List[nn.Module]]:
    """Within the block, norm layers with running statistics are in train mode, every other module in eval
    mode (dropout and drop-path off: statistics of the network as it is evaluated), and blocks compiled in
    place run eagerly. Yields the norm layers: call `cumulative_momentum(norms, k)` before calibration batch
    k for an equal-weight average over batches, as `recalibrate_bn`. Restored on exit."""
    norms = _stat_norms(model)
    momenta = [m.momentum for m in norms]
    with _all_modes_kept(model), eager_blocks(model):
        try:
            stat_norms = set(norms)
            for m in model.modules():
                m.training = m in stat_norms
            yield norms
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum


def calibration_batches(loader: Iterable, num_images: int, device: Optional[torch.device],
                        channels_last: bool = False) -> Iterator[torch.Tensor]:
    """The calibration images, batch by batch, until `num_images` are reached (whole batches, as
    `recalibrate_bn` takes them), on `device` (None: where the loader put them); a loader may yield images
    or (images, targets)."""
    seen = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if device is not None:
            x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x
        seen += x.shape[0]
        if seen >= num_images:
            return


# ------------------------------------------------------------------------------------------------
# Splits of the built-in families (each mirrors the model's forward_features / forward_head).
# ------------------------------------------------------------------------------------------------

def _register_builtin() -> None:
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.regnet import RegNet
    from timm.models.resnet import ResNet

    from ..models.cifar_resnet import CifarResNet

    register_tree_split(ResNet, lambda m: TreeSplit(stem=lambda x: m.maxpool(m.act1(m.bn1(m.conv1(x)))),
                                                    head=m.forward_head))
    register_tree_split(CifarResNet, lambda m: TreeSplit(stem=m.stem, head=m.forward_head))
    register_tree_split(RegNet, lambda m: TreeSplit(stem=m.stem, head=lambda x: m.forward_head(m.final_conv(x))))
    register_tree_split(ConvNeXt, lambda m: TreeSplit(stem=m.stem, head=lambda x: m.forward_head(m.norm_pre(x)),
                                                      enter=tuple(stage.downsample for stage in m.stages)))
    register_tree_split(EfficientNet, lambda m: TreeSplit(stem=lambda x: m.bn1(m.conv_stem(x)),
                                                          head=lambda x: m.forward_head(m.bn2(m.conv_head(x)))))
    register_tree_split(MobileNetV3, lambda m: TreeSplit(stem=lambda x: m.bn1(m.conv_stem(x)), head=m.forward_head))


_register_builtin()
