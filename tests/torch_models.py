"""Small real PyTorch models (``nn.LSTM`` / ``nn.GRU``), trained for seconds and exported with
``torch.onnx.export`` the way users do: the tests convert what the real exporter writes.

Classifiers learn the BasicMotions recordings per step, regressors the synthetic signals of
``build_bundles.regression_data``. Normalisation is part of the model (``(x - mean) / std``
as buffers), so devices send raw units and the converter reads it as the input normalisation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Recipe:
    kind: str  # "LSTM" or "GRU"
    layers: int
    task: str  # "clf" or "reg"
    batch_first: bool = True
    exporter: str = "dynamo"  # torch 2.13's default; "legacy" = the TorchScript exporter
    units: int = 16
    epochs: int = 200
    seed: int = 0
    noise: float = 0.5  # training-time input noise (normalised units), as the Keras example
    lr: float = 1e-2
    forget_bias: float = 1.0  # added to the LSTM forget gate's bias at initialisation
    head: str = "step"  # per step; many-to-one: "last" (out[:, -1]) or "h_n" (h_n[-1])


def _net(recipe: Recipe, features: int, outputs: int, mean: np.ndarray, std: np.ndarray) -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
            rnn = nn.LSTM if recipe.kind == "LSTM" else nn.GRU
            self.rnn = rnn(
                features,
                recipe.units,
                num_layers=recipe.layers,
                batch_first=recipe.batch_first,
                dropout=0.1 if recipe.layers > 1 else 0.0,
            )
            if recipe.kind == "LSTM" and recipe.forget_bias:  # as Keras' unit_forget_bias
                with torch.no_grad():
                    for name, b in self.rnn.named_parameters():
                        if name.startswith("bias_ih"):
                            b[recipe.units : 2 * recipe.units] += recipe.forget_bias
            self.head = nn.Linear(recipe.units, outputs)
            self.classify = recipe.task == "clf"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = (x - self.mean) / self.std
            if self.training and recipe.noise:
                z = z + recipe.noise * torch.randn_like(z)
            y, h_n = self.rnn(z)
            if recipe.head == "last":  # many-to-one, the tutorials' way
                y = y[:, -1] if recipe.batch_first else y[-1]
            elif recipe.head == "h_n":
                y = (h_n[0] if recipe.kind == "LSTM" else h_n)[-1]
            y = self.head(y)
            return torch.softmax(y, dim=-1) if self.classify else y

    return Net()


def data(task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y); x [N, T, F] raw units, y per sequence (clf) or per
    step (reg)."""
    if task == "clf":
        from convert.datasets import basicmotions

        tr, te = basicmotions("train"), basicmotions("test")
        return tr.x, tr.labels, te.x, te.labels
    from tests.build_bundles import regression_data

    x, y = regression_data(160, 60, seed=1)
    xt, yt = regression_data(40, 60, seed=2)
    return x, y, xt, yt


def train(recipe: Recipe) -> tuple[Any, dict[str, np.ndarray]]:
    """The trained model (eval mode) and its data: train x (calibration), test x and y."""
    import torch

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(1)  # small models: threads cost more than they give
    x, y, xt, yt = data(recipe.task)
    mean, std = x.reshape(-1, x.shape[-1]).mean(0), x.reshape(-1, x.shape[-1]).std(0) + 1e-6
    outputs = int(y.max()) + 1 if recipe.task == "clf" else y.shape[-1]
    net = _net(recipe, x.shape[-1], outputs, mean, std)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    xs = torch.tensor(x)
    if recipe.task == "clf":
        target = torch.tensor(np.repeat(y[:, None], x.shape[1], axis=1))
    else:
        target = torch.tensor(y)
    many_to_one = recipe.head != "step"
    if many_to_one:  # one label per sequence: the last step's
        target = target[:, -1]
        yt = yt if recipe.task == "clf" else yt[:, -1]
    net.train()
    for _ in range(recipe.epochs):
        inp = xs if recipe.batch_first else xs.transpose(0, 1)
        out = net(inp)
        out = out if recipe.batch_first or many_to_one else out.transpose(0, 1)
        if recipe.task == "clf":
            loss = torch.nn.functional.nll_loss(
                torch.log(out.clamp_min(1e-7)).reshape(-1, outputs), target.reshape(-1)
            )
        else:
            loss = ((out - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net, {"calib": x, "x": xt, "y": yt}


def export(net: Any, recipe: Recipe, path: Path) -> None:
    """``torch.onnx.export`` with dynamic batch and time axes, as the recipe says."""
    with warnings.catch_warnings():  # the exporters' own notes (deprecations, tracing)
        warnings.simplefilter("ignore")
        _export(net, recipe, path)


def _export(net: Any, recipe: Recipe, path: Path) -> None:
    import torch

    shape = (2, 5, net.rnn.input_size) if recipe.batch_first else (5, 2, net.rnn.input_size)
    x = torch.zeros(shape)
    names = (0, 1) if recipe.batch_first else (1, 0)  # (batch axis, time axis)
    if recipe.exporter == "dynamo":
        dims = {names[0]: torch.export.Dim("batch"), names[1]: torch.export.Dim("time")}
        if recipe.head != "step":  # named Dims let torch.export fix the time length here
            dims = {names[0]: torch.export.Dim.AUTO, names[1]: torch.export.Dim.AUTO}
        torch.onnx.export(
            net,
            (x,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes={"x": dims},
            verbose=False,
        )
    else:
        axes = {names[0]: "batch", names[1]: "time"}
        out_axes = axes if recipe.head == "step" else {0: "batch"}
        torch.onnx.export(
            net,
            (x,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": axes, "y": out_axes},
            dynamo=False,
        )


def run_torch(net: Any, recipe: Recipe, x: np.ndarray) -> np.ndarray:
    """The PyTorch model's own outputs for [N, T, F] sequences, as [N, T, O] ([N, O] for a
    many-to-one model)."""
    import torch

    with torch.no_grad():
        t = torch.tensor(np.asarray(x, np.float32))
        out = net(t if recipe.batch_first else t.transpose(0, 1))
        keep = recipe.batch_first or recipe.head != "step"
        return (out if keep else out.transpose(0, 1)).numpy()


def build(recipe: Recipe, out: Path) -> dict[str, Path]:
    """Train, export and save: model.onnx, calib.npy, test.npz (x, y) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    net, d = train(recipe)
    export(net, recipe, out / "model.onnx")
    np.save(out / "calib.npy", d["calib"])
    np.savez(out / "test.npz", x=d["x"], y=d["y"])
    return {"model": out / "model.onnx", "calib": out / "calib.npy", "test": out / "test.npz"}
