"""``python -m experiments.run +model=NAME +bits=B ...``: the experiment runner (:mod:`experiments.runner.run`)."""

from experiments.runner.run import main

if __name__ == "__main__":
    main()
