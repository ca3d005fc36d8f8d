"""Write the example checkpoints shipped in examples/ (run from the repository root).

    python examples/make_checkpoints.py

- ddp_checkpoint.pt: a training checkpoint as DistributedDataParallel code saves it: the state
  dict under "model_state_dict" with every key prefixed "module.", plus optimizer state,
  epoch and hyper-parameters.
- plain_weights.safetensors: the same weights without the prefix, as an inference export.

Try: ptools inspect-state-dict examples/ddp_checkpoint.pt --diff examples/plain_weights.safetensors
"""

from pathlib import Path

import torch
from safetensors.torch import save_file


class SmallConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU())
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.BatchNorm2d(16),
                                         torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def main() -> None:
    torch.manual_seed(0)
    model = SmallConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 10, (4,))).backward()
        optimizer.step()
    folder = Path(__file__).parent
    ddp_state = {f"module.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"model_state_dict": ddp_state, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3,
                "hyper_parameters": {"lr": 0.1, "momentum": 0.9, "batch_size": 4}},
               folder / "ddp_checkpoint.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "plain_weights.safetensors"),
              metadata={"format": "pt"})


if __name__ == "__main__":
    main()
