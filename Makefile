# make install: .venv with the pinned requirements (runtime and tests; reinstalled only when they change)
# make demo:    the whole pipeline on the built-in synthetic dataset, on a CPU, in a few minutes (the model
#               fine-tuned from pretrained/UCSDped2-cpu), then one test video scored as a user's own
#               (--input), with its overlay video
# make test:    the test suite, its files spread over the cores (pytest-xdist)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
DEMO := outputs/demo

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	cat requirements.txt requirements-dev.txt > $(STAMP)

test: install
	$(PY) -m pytest -q -n auto --dist loadfile

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: install
	$(PY) data_preparation.py --make_synthetic --overwrite --raw_data $(DEMO)/raw --preprocessed_data $(DEMO)/preprocessed \
		--dataset Synthetic --synthetic_size 120x180 --size 64x96
	$(PY) train.py --config config/cpu.json --preprocessed_data $(DEMO)/preprocessed --dataset Synthetic \
		--model_dir $(DEMO)/model --fine_tuning pretrained/UCSDped2-cpu --overwrite
	$(PY) batch_scoring.py --preprocessed_data $(DEMO)/preprocessed --dataset Synthetic --model_dir $(DEMO)/model \
		--scored_data $(DEMO)/scored --overwrite
	$(PY) fit_anoms.py --scored_data $(DEMO)/scored --model_dir $(DEMO)/anoms --overwrite
	$(PY) batch_scoring.py --model_dir $(DEMO)/model --input $(DEMO)/raw/UCSD_Anomaly_Dataset.v1p2/Synthetic/Test/Test001 \
		--scored_data $(DEMO)/clip --overwrite
	@echo "demo done: $(DEMO)/scored/metrics.md and scores.png (the test videos), $(DEMO)/anoms/report.md (the classifiers), $(DEMO)/clip/overlays/Test001.mp4 (the heat map video)"

clean:
	rm -rf outputs .pytest_cache
