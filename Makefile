# dumo-engine: common tasks. `make test` is the README's (and CI's) test command.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install test digits compare clean

install:            ## editable install with test extras (CPU torch wheel pinned in pyproject)
	$(PIP) install -e '.[test,triton]'

test:               ## the whole suite, < 10 minutes on 2 cores
	$(PY) -m pytest -q

digits:             ## the embedded default main job (< 5 minutes on 2 CPU cores)
	dumo train --config configs/digits.yaml

compare:            ## FM vs MeanFlow vs DuMo and ablations on digits, 3 seeds (about 40 minutes on 2 cores)
	$(PY) benchmarks/compare_objectives.py

clean:
	rm -rf runs build *.egg-info .pytest_cache
