"""The settings of a federated run, and how they travel as Flower run config (kebab-case keys).

One dataclass is the single source of the keys and defaults: the server launcher writes them into the
Flower app's [tool.flwr.app.config], --run-config overrides them, and the ServerApp and ClientApp read
them back with from_run_config. Flower config values cannot be None, so "" and 0 mean "unset".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from noprop.methods import METHODS, model_config
from noprop.model_configs import ContinuousConfig, NoPropConfig, parse_embedding
from noprop.partition import parse_partitioning
from noprop.settings import from_mapping
from noprop.sources import DatasetError

# rotate: a block moves to other owners each round; replicate: --replicas owners a block; stay: a block keeps its
# owners while the nodes are the same (under the ensemble readout each block becomes its owners' expert)
POLICIES = ("rotate", "replicate", "stay")
AGGREGATIONS = ("mean", "median", "trimmed-mean")  # of the shared embedding and head


class FederationError(Exception):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class FederationConfig:
    method: str = "dt"  # dt: block ownership; ct | fm | adjoint | backprop | cnn: FedAvg of the one network
    num_rounds: int = 5
    T: int = 10
    policy: str = "rotate"
    replicas: int = 2  # owners per block under the replicate policy
    min_nodes: int = 2
    # client sampling (noprop.sampling): the share of the connected nodes that train each round, in a seeded
    # rotation (each node once every ceil(1 / fraction) rounds), and the fewest that do
    fraction_train: float = 1.0
    min_train_nodes: int = 1
    local_epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    embedding: str = "one-hot"
    head: str = "softmax"
    eta: float = 0.0  # 0 = the method's default (dt 0.1, ct 1.0)
    clip: float = 1e-4
    steps: int = 0  # ct | fm | adjoint: integration steps at inference (0 = the method's default)
    solver: str = ""  # fm: euler | heun; adjoint: euler | midpoint | rk4 ("" = euler)
    fm_sigma: float = 0.1  # fm: width of the Gaussian path
    channels: str = "32,64,128"
    hidden: int = 256
    dropout: float = 0.2
    norm: str = "batch"  # dt: the blocks' normalisation, batch (Figure 6) | layer (no running statistics)
    # dt: blocks add the closed-form class posterior given z to their logits (not Figure 6; --no-z-skip is): under
    # label skew the paper's block lost whole classes (Dirichlet(0.5): 82.0% against 85.5% after 6 rounds, 57.4%
    # against 81.8% after 2; BENCHMARKS.md)
    z_skip: bool = True
    # dt: chain (Eq. 3) | ensemble: the prediction is the geometric mean of the blocks' posteriors from x alone, so
    # under label skew no single late block decides. Same weights, 10 clients (BENCHMARKS.md "The ensemble
    # readout"), 6 rounds: 2 classes a client 50.5% against the chain's 35.4%, Dirichlet(0.1) 62.2/59.4, IID
    # 86.6/86.2; over 20 rounds of Dirichlet(0.1) the chain leads from round 7 (final 74.3 against 73.0)
    readout: str = "ensemble"
    z_dropout: float = 0.0  # dt: share of each batch whose z_{t-1} is zeroed in training (block t reads x alone)
    head_steps: int = 500  # dt: steps the server trains the head each round, class-balanced on q(z_T | y) (0 = off)
    logit_adjust: bool = True  # dt: nodes add their label prior to the logits while training (balanced softmax)
    # a node raises its local epochs until each block (network) gets this many steps: 3 nodes of 500 examples got
    # 4 steps a block a round (round 1: 34.9% with 0, 82.2% with 50; BENCHMARKS.md)
    min_local_steps: int = 40
    # dt: a block moves towards its owners' mean by the share of the classes they hold (2 of 10: a fifth)
    coverage_step: bool = True
    label_aware: bool = True  # dt: owners of a block are picked to hold different classes (from discovery)
    # dt: the plan gives a node work in proportion to the throughput it measured at discovery; noprop-sim turns it
    # off, because virtual clients share one machine and their timings measure contention (3x apart run to run)
    plan_by_speed: bool = True
    split_local_data: bool = False  # dt: a node's k blocks each train on their own 1/k of its data (one block-epoch)
    dataset: str = "fashion-mnist"  # the server evaluates on its test split; clients default to it
    data_root: str = ""  # "" = $NOPROP_DATA or ./data
    client_data: str = ""  # dataset of clients whose node config names none ("" = dataset)
    partition_type: str = "iid"  # iid | dirichlet:ALPHA | classes:K, for clients without their own
    eval_limit: int = 2000  # test examples evaluated each round (0 = all)
    final_eval_limit: int = 0  # test examples evaluated after the last round (0 = all)
    eval_mode: str = "deterministic"
    # dt: evaluate and checkpoint round r while round r+1 trains (the last round: before the end, as ever)
    eval_in_background: bool = True
    client_eval: bool = False  # also ask the nodes to evaluate the round's model on their test data
    out: str = "runs/federated"
    resume: bool = False
    seed: int = 0
    round_timeout: float = 900.0  # seconds a round waits for replies
    join_timeout: float = 300.0  # seconds the first round waits for min_nodes
    rejoin_timeout: float = 30.0  # seconds a later round waits for min_nodes before going on with fewer
    reply_poll_s: float = 0.2  # the ServerApp looks for replies this often (Flower's own Grid: every 3 s)
    client_threads: int = 0  # torch threads per client process (0 = torch's default)
    aggregation: str = "mean"  # of the shared embedding and head: mean | median | trimmed-mean
    trim_fraction: float = 0.2  # trimmed-mean: share of replies cut at each end, per coordinate
    max_value_ratio: float = 1000.0  # a reply value may be at most this many times the global tensor's largest
    # magnitude (at least 1); measured on Fashion-MNIST, honest updates reach 42 (BatchNorm running variances in
    # round 1 at lr 3e-3, 3 local epochs; bench/update_range.py, BENCHMARKS.md)

    def validate(self) -> FederationConfig:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name.replace('_', '-')}={getattr(self, name)!r}: {why}")

        for name in ("num_rounds", "T", "min_nodes", "local_epochs", "batch_size", "hidden", "replicas",
                     "min_train_nodes"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.method not in METHODS:  # dt: block ownership; the others: FedAvg of the one network
            raise bad("method", f"use one of {', '.join(METHODS)}")
        if self.policy not in POLICIES:
            raise bad("policy", f"use one of {', '.join(POLICIES)}")
        for name in ("lr", "round_timeout", "join_timeout", "reply_poll_s"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be positive")
        for name in ("eta", "steps", "fm_sigma"):
            if getattr(self, name) < 0:
                raise bad(name, "must be 0 (the method's default) or positive")
        if not 0 < self.fraction_train <= 1:
            raise bad("fraction_train", "must be above 0 and at most 1 (the share of the nodes that train a round)")
        if self.rejoin_timeout < 0:
            raise bad("rejoin_timeout", "must be 0 (go on at once) or positive")
        for name in ("head_steps", "min_local_steps"):
            if getattr(self, name) < 0:
                raise bad(name, "must be 0 (off) or positive")
        if self.eval_limit < 0 or self.final_eval_limit < 0:
            raise bad("eval_limit", "must be 0 (all) or a positive number")
        if self.eval_mode not in ("deterministic", "stochastic"):
            raise bad("eval_mode", "use deterministic or stochastic")
        if self.aggregation not in AGGREGATIONS:
            raise bad("aggregation", f"use one of {', '.join(AGGREGATIONS)}")
        if not 0 <= self.trim_fraction < 0.5:
            raise bad("trim_fraction", "must be at least 0 and below 0.5 (the share cut at each end)")
        if not self.max_value_ratio > 1:
            raise bad("max_value_ratio", "must be above 1 (a bound relative to the global model's values)")
        try:
            parse_partitioning(self.partition_type)
        except DatasetError as exc:
            raise bad("partition_type", str(exc)) from None
        self.channel_tuple()
        self.model_config((1, 8, 8), 2)  # the method's own checks (solver, steps) fail here, before any process
        if parse_embedding(self.embedding)[0] == "prototype":  # a method with no embedding said so just above
            raise bad("embedding", "prototype embeddings need training images on the server; federated runs "
                                   "support one-hot and learned:D")
        return self

    def round_shape(self) -> str:
        """The round in a few words ("T=10, policy rotate"; "FedAvg of one cnn network"), from METHODS."""
        return METHODS[self.method].round_shape.format(**asdict(self))

    def channel_tuple(self) -> tuple[int, int, int]:
        parts = tuple(int(p) for p in str(self.channels).split(","))
        if len(parts) != 3 or min(parts) < 1:
            raise ValueError(f"channels={self.channels!r}: give three positive conv widths, e.g. 32,64,128")
        return parts

    def model_config(self, input_shape: tuple[int, ...], num_classes: int) -> NoPropConfig | ContinuousConfig:
        return model_config(self.method, input_shape, num_classes, T=self.T, embedding=self.embedding,
                            head=self.head, eta=self.eta or None, clip=self.clip, channels=self.channel_tuple(),
                            hidden=self.hidden, dropout=self.dropout, steps=self.steps or None,
                            solver=self.solver or None, fm_sigma=self.fm_sigma, norm=self.norm,
                            z_skip=self.z_skip, readout=self.readout,
                            z_dropout=self.z_dropout)

    def to_run_config(self) -> dict[str, int | float | str | bool]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederationConfig:
        """Keys this class does not know are ignored (Flower adds none, but apps may carry extras); values are
        coerced by declared type (Flower may hand back ints for float fields and vice versa)."""
        return cls(**from_mapping(cls, run_config)).validate()
