"""A1111's install hook: installs the few requirements the web UI lacks.

A1111 (and Forge) run this file in a subprocess with their own folder on
PYTHONPATH, before loading extensions. The web UI brings torch and gradio
(pinned by it: never replace them), and already pins the packages below; pip
runs only for one that is missing. Keep ``REQUIREMENTS`` in step with
requirements.txt (a test checks it).
"""

# Distribution name → pip requirement, from requirements.txt minus what the web UI provides.
REQUIREMENTS = {
    "safetensors": "safetensors>=0.4",
    "numpy": "numpy>=1.24",
    "tqdm": "tqdm>=4.60",
    "Pillow": "Pillow>=9.5",
}

# fp8 dtypes (torch.float8_e4m3fn) arrived in torch 2.1; A1111 v1.5-v1.7 install torch 2.0.1 by default.
MINIMUM_TORCH = (2, 1)


def torch_too_old(version: str) -> bool:
    """Whether a torch version string ("2.0.1+cu118") is older than ``MINIMUM_TORCH``."""
    numbers = [int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit()]
    return tuple(numbers) < MINIMUM_TORCH


def torch_warning(version: str) -> str:
    """What to tell a user whose web UI runs too old a torch (we never replace the web UI's torch)."""
    if not torch_too_old(version):
        return ""
    wanted = ".".join(map(str, MINIMUM_TORCH))
    return (f"SuperMerger needs torch {wanted} or newer; this web UI runs torch {version}. Update the web UI "
            f"(A1111 v1.8+ installs torch 2.1) or set TORCH_COMMAND to a newer torch; the tab stays off until then.")


def missing(launch) -> list[str]:
    """The requirements ``launch.is_installed`` does not find."""
    return [requirement for name, requirement in REQUIREMENTS.items() if not launch.is_installed(name)]


def install(launch) -> list[str]:
    """Install what is missing through ``launch.run_pip``; returns the requirements installed."""
    needed = missing(launch)
    for requirement in needed:
        # Quoted: A1111 runs pip through the shell, where ">=" would redirect.
        launch.run_pip(f'install "{requirement}"', f"{requirement} for SuperMerger")
    return needed


if __name__ == "__main__":
    import launch

    install(launch)
    try:
        import torch
    except ImportError:  # the web UI installs torch after extensions' hooks on a first start
        pass
    else:
        if torch_warning(torch.__version__):
            print(torch_warning(torch.__version__))
