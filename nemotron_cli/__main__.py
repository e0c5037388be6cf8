"""``python -m nemotron_cli`` runs the same app as the ``nemotron`` console script."""
from nemotron_cli.app import main

if __name__ == "__main__":  # guarded so that importing this module (e.g. in tests) runs nothing
    main()
