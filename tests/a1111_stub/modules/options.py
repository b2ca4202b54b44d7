"""Stand-in for modules/options.py: ``opts`` reads ``data`` first, then the defaults."""


class Options:
    """A1111's settings object: ``opts.name`` is ``opts.data[name]`` or the option's default."""

    def __init__(self, defaults: dict):
        self.__dict__["data_labels"] = dict(defaults)
        self.__dict__["data"] = {}

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item]
        raise AttributeError(item)

    def __setattr__(self, key, value):
        if key in self.data_labels:
            self.data[key] = value
        else:
            super().__setattr__(key, value)

    def get_default(self, key):
        return self.data_labels.get(key)
