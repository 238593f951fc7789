"""Speed and memory benchmarks of this repository, run from the repository root as ``python -m benchmarks <task>``
(``python -m benchmarks --help`` lists the tasks). Results go to runs/benchmarks/."""
