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
