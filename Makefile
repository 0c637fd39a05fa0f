# The two commands of the README: `make demo` (train + score + figures on the synthetic phantom)
# and `make test`. Both create .venv and install requirements.txt on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GPU ?=
RUN ?= runs/demo
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo train predict test bench real-anatomy venv clean

# One stamp per build, so `make venv GPU=1` on a CPU venv does swap TensorFlow.
REQUIREMENTS := requirements$(if $(filter 1,$(GPU)),-gpu).txt
STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu)
venv: $(STAMP)
$(STAMP): $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(filter 1,$(GPU)),$(PY) -m pip uninstall --quiet --yes tensorflow-cpu)
	$(PY) -m pip install --quiet -r $(REQUIREMENTS)
	touch $@

demo: venv  ## train on the demo phantom (resuming if interrupted), then score the test split
	$(PY) train.py --out $(RUN) --resume
	$(PY) predict.py --run $(RUN)

train: venv
	$(PY) train.py --out $(RUN) --resume

predict: venv
	$(PY) predict.py --run $(RUN)

test: venv
	$(PY) -m pytest -q -n 2 --dist loadgroup --timeout 600 tests

bench: venv
	$(PY) benchmarks/bench.py

real-anatomy: venv  ## this project against MONAI and the seed's Keras U-Net on real MRI (hours on 2 cores); BRATS=, HIPPOCAMPUS=folder
	$(PY) benchmarks/real_anatomy.py $(if $(BRATS),--brats-dir $(BRATS)) $(if $(HIPPOCAMPUS),--hippocampus-dir $(HIPPOCAMPUS))

clean:  ## the venv, the demo run and the demo phantom (other runs are left alone)
	rm -rf $(VENV) $(RUN) data/phantom-demo
