# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both bootstrap the environment first: uv (installed with pip if missing), a .venv made from the
# machine's python3, torch (the CPU wheel in /opt/wheels when the machine ships one, otherwise
# PyPI), then himap itself in editable mode with its dev extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: env test lint demo generate train-model ship-model train-smol ship-smol clean

$(BIN)/himap: pyproject.toml constraints.txt
	bash scripts/bootstrap.sh
	@touch $@

env: $(BIN)/himap

test: env
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: env
	$(BIN)/ruff check src tests

# main job: the shipped tiny trained LLaVA, dense vs every method on held-out questions (< 2 min)
demo: env
	HF_HUB_OFFLINE=1 $(BIN)/himap demo --out out/demo

# one prompt through a tiny *random* LLaVA with HiMAP, timed against dense (token counts, not accuracy)
generate: env
	HF_HUB_OFFLINE=1 $(BIN)/himap tiny-model out/tiny-llava
	HF_HUB_OFFLINE=1 $(BIN)/himap generate --model out/tiny-llava --image out/tiny-llava/example.png \
		--prompt "What is in the picture?" --method "himap(k1=2,r1=0.5,k2=4,r2=0.75)" --compare

# Train the shipped tiny LLaVA from scratch (about 2 hours on 2 cores; resumable): runs/tiny-llava*
train-model: env
	bash scripts/train_tiny_llava_recipe.sh runs

# Copy a trained tiny LLaVA (save_pretrained folder of scripts/train_tiny_llava.py) into the package,
# with scripts/MODEL_CARD.md as its README.md:  make ship-model RUN=runs/tiny-llava-p5/best
RUN ?= runs/tiny-llava-p5/best
ASSET := src/himap_vlm/assets/tiny_llava
ship-model:
	test -f $(RUN)/model.safetensors
	rm -rf $(ASSET) && mkdir -p $(ASSET)
	for f in config.json generation_config.json model.safetensors processor_config.json \
		tokenizer.json tokenizer_config.json chat_template.jinja training_info.json; do \
		if [ -f $(RUN)/$$f ]; then cp $(RUN)/$$f $(ASSET)/; fi; done
	cp scripts/MODEL_CARD.md $(ASSET)/README.md

# Train smol-llava (SmolLM2-135M-Instruct + vision tower, projector, LoRA; hours on 2 cores;
# resumable): runs/smol-llava*  (scripts/SMOL_MODEL_CARD.md)
train-smol: env
	bash scripts/train_smol_llava_recipe.sh runs

# Copy trained smol-llava parts into the package, with scripts/SMOL_MODEL_CARD.md as README.md:
#   make ship-smol SMOL_RUN=runs/smol-llava-p2/best
SMOL_RUN ?= runs/smol-llava-p2/best
SMOL_ASSET := src/himap_vlm/assets/smol_llava
ship-smol:
	test -f $(SMOL_RUN)/model_parts.safetensors
	rm -rf $(SMOL_ASSET) && mkdir -p $(SMOL_ASSET)
	for f in model_parts.safetensors adapter_model.safetensors adapter_config.json llava_config.json \
		processor_config.json chat_template.jinja training_info.json; do \
		if [ -f $(SMOL_RUN)/$$f ]; then cp $(SMOL_RUN)/$$f $(SMOL_ASSET)/; fi; done
	cp scripts/SMOL_MODEL_CARD.md $(SMOL_ASSET)/README.md

clean:
	rm -rf $(VENV) out
