#!/bin/bash
# Packs what the text-LM work (issue 17) needs on the GPU machine beyond the training stack
# (shared/device/train-stack-pack.sh): HF datasets and lm-evaluation-harness with the dependencies its
# image lacks, as py3.12 wheels in one folder (< 64 MiB, one carry).
#
#   usage (repo root, on the CPU machine):  bash scripts/device/text-stack-pack.sh .textstack
#   device side, in the same call as the training stack's part b (or after it):
#     python3 -m pip install --no-deps --no-index --target /tmp/site .textstack/*.whl
set -euo pipefail
dest=${1:?usage: text-stack-pack.sh DEST}
if git rev-parse --git-dir >/dev/null 2>&1; then
  ex="$(git rev-parse --git-dir)/info/exclude"; mkdir -p "$(dirname "$ex")"
  grep -qxF "/$dest/" "$ex" 2>/dev/null || echo "/$dest/" >> "$ex"
fi
dl="$dest/.dl"; mkdir -p "$dl"; rm -f "$dest"/*.whl
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
pyargs="--python-version 3.12 --implementation cp $plat"
# pure-Python sdists (no wheels on the index) are built here; everything else is downloaded as binary wheels
python3 -m pip wheel -q --no-deps -w "$dl" rouge-score sqlitedict word2number 2>&1 | grep -v "^WARNING: Location" || true
python3 -m pip download -q --only-binary=:all: $pyargs -d "$dl" "datasets==5.2.0" "lm-eval==0.4.13" \
  --no-deps 2>&1 | grep -v "^WARNING: Location" || true
python3 -m pip download -q --only-binary=:all: $pyargs -d "$dl" evaluate sacrebleu pytablewriter dill==0.4.0 \
  "multiprocess<0.70.20" more-itertools xxhash nltk portalocker colorama lxml tabledata tcolorpy typepy \
  dataproperty mbstrdecoder chardet pathvalidate absl-py 2>&1 | grep -v "^WARNING: Location" || true
# already on the GPU image (its package list, 2026-11): not carried
have=" absl-py aiohttp certifi charset-normalizer click colorama filelock fsspec huggingface-hub idna jinja2
joblib lxml markupsafe numpy packaging pandas portalocker pyarrow python-dateutil pytz pyyaml regex requests
scikit-learn scipy six tabulate threadpoolctl tokenizers torch tqdm transformers typing-extensions tzdata urllib3
xxhash aiohappyeyeballs aiosignal attrs anyio frozenlist h11 hf-xet multidict propcache yarl setuptools
cloudpickle "
for f in "$dl"/*.whl; do
  n=$(basename "$f" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  [[ "$have" == *" $n "* || "$have" == *$'\n'"$n "* || "$have" == *" $n"$'\n'* ]] && continue
  cp "$f" "$dest/"
done
du -sh "$dest"/*.whl | sort -h | tail -5
echo "total: $(du -ch "$dest"/*.whl | tail -1 | cut -f1) in $(ls "$dest"/*.whl | wc -l) wheels in $dest"
