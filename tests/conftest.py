import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the fixture builders next to the tests
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))  # tools the tests load (the built-in tokenizer script)
