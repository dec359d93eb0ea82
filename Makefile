# The two set-up commands of the README:
#   make demo   install everything, then run the CPU demo study (config.yaml)
#   make test   install everything, then run the test suite
# and, for enough seeds that the claims can decide: make reference (about an hour on 2 cores)
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install data slurm-cluster demo reference rehearsal test lint clean

install: $(VENV)/.installed data

# torch and torchvision resolve to whatever pip finds (on the dev machines: local wheels)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	# 20 real CIFAR-10 test images for the CIFAR-10 loader's tests (no deps: only the PNGs)
	$(VENV)/bin/pip install --quiet --no-deps foolbox==3.3.4
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends dataset-fashion-mnist

# the one-node SLURM cluster (slurmctld, slurmd, slurmdbd, MariaDB, munge) the SLURM tests use
slurm-cluster:
	$(SUDO) bash tests/slurm/cluster.sh up

demo: install
	snakemake --cores $(CORES)
	@echo "results: results/tables/cka.parquet, results/figures/*.png"

# the demo with five seeds per method (README: "The reference study"), in its own folder
reference: install
	snakemake --cores $(CORES) --configfile configs/reference.yaml --directory reference-run
	@echo "results: reference-run/results/summary.md"

# the paper's study in miniature (README: "Scale rehearsal"), in its own folder
rehearsal: install
	snakemake --cores $(CORES) --configfile configs/rehearsal.yaml --directory rehearsal-run
	ckaflow plan configs/rehearsal.yaml

test: install slurm-cluster
	pytest -q

lint: install
	ruff check .
	ruff format --check .
	snakemake --lint

clean:
	rm -rf results .snakemake
