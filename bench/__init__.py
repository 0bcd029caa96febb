"""`densetriton bench`: densetriton against torchvision and torch.compile, results kept in bench/results/."""
