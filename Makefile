# Two entry points (README): `make demo` (the main job on the embedded default) and `make test`.
# Both set up everything on a fresh Debian/Ubuntu machine: CJK fonts (apt), a venv, pinned packages.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FONTS  := fonts-noto-cjk fonts-wqy-zenhei fonts-wqy-microhei fonts-arphic-ukai fonts-arphic-uming fonts-lxgw-wenkai fonts-smiley-sans
# The web demo's browser test (tests/test_infer_app.py) drives Debian's chromium through chromedriver.
BROWSER := chromium chromium-driver
DEMO_MODEL := runs/tiny_models/deepseek_ocr_v1_demo
DEMO_DATA  := runs/demo_data
DEMO_RUN   := runs/demo_cpu
# The demo's figures depend on the float reduction order, hence on torch's thread count: pinned, so every
# 2-core machine computes the same sums (torch would otherwise pick the number of physical cores).
DEMO_THREADS ?= 2
DEMO_ENV   := OMP_NUM_THREADS=$(DEMO_THREADS) MKL_NUM_THREADS=$(DEMO_THREADS) TOKENIZERS_PARALLELISM=false

.PHONY: setup fonts browser demo test test-slow lint clean-demo

fonts:
	@if ! fc-list 2>/dev/null | grep -qi "Noto Sans CJK"; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(FONTS) >/dev/null; \
	  else echo "install CJK fonts (Debian: $(FONTS))"; exit 1; fi; fi

browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(BROWSER) >/dev/null; \
	  else echo "install chromium and chromedriver (Debian: $(BROWSER))"; exit 1; fi; fi

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: fonts $(VENV)/.installed

# Generate a small synthetic set (amounts, dates, order numbers: a narrow charset a tiny model learns in
# minutes), make the demo's tiny random v1, fine-tune it on CPU (LoRA on the language model, and, for this
# random model only, the vision towers + projector in full: configs/demo_cpu.yaml) with checkpoints, score
# base vs fine-tuned on the held-out test lines, and print the summary (eval/summary.py).
demo: setup
	$(DEMO_ENV) $(PY) -m data.generate --preset demo --out $(DEMO_DATA) --train 2000 --val 200 --test 200 --seed 0
	$(DEMO_ENV) $(PY) -m dsocr.models.make_tiny --family deepseek_ocr_v1 --demo --out $(DEMO_MODEL)
	$(DEMO_ENV) $(PY) train/train_lora.py --config configs/demo_cpu.yaml
	$(DEMO_ENV) $(PY) eval/eval_cer.py --config configs/demo_cpu.yaml --ckpt $(DEMO_MODEL) --ckpt $(DEMO_RUN)/final \
	  --name base --name finetuned --out $(DEMO_RUN)/compare
	$(DEMO_ENV) $(PY) eval/summary.py --compare $(DEMO_RUN)/compare --run $(DEMO_RUN) --data $(DEMO_DATA)

test: setup browser
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m "slow or not slow"

lint: setup
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf $(DEMO_RUN) $(DEMO_DATA) $(DEMO_MODEL) runs/tiny_cpu
