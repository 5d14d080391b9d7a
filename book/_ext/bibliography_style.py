"""Author-year labels for the bibliography list ("Abbas et al. 2025" instead of pybtex's alpha "[APLPC25]"), so the
list reads like the in-text citations (``bibtex_reference_style: author_year``). Loaded by Sphinx as a local
extension (see ``_config.yml``); registering the pybtex plugins at import is all it needs to do."""

from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle


def _surname(person) -> str:
    return Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as("text")


class AuthorYearLabelStyle(BaseLabelStyle):
    """"Surname year", "Surname and Surname year" or "Surname et al. year"; repeats get a, b, ... after the year."""

    def format_labels(self, sorted_entries):
        labels = []
        for entry in sorted_entries:
            people = entry.persons.get("author") or entry.persons.get("editor") or []
            names = [_surname(p) for p in people]
            if not names:
                who = entry.fields.get("title", entry.key).split(":")[0]
            elif len(names) == 1:
                who = names[0]
            elif len(names) == 2 and "others" not in names:
                who = f"{names[0]} and {names[1]}"
            else:
                who = f"{names[0]} et al."
            labels.append(f"{who} {entry.fields.get('year', 'n.d.')}")
        repeats, seen = Counter(labels), Counter()
        for label in labels:
            if repeats[label] > 1:
                seen[label] += 1
                label += "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
            yield label


class AuthorYearListStyle(PlainStyle):
    default_label_style = "author_year_list"


register_plugin("pybtex.style.labels", "author_year_list", AuthorYearLabelStyle)
register_plugin("pybtex.style.formatting", "author_year_list", AuthorYearListStyle)


def setup(app):
    return {"parallel_read_safe": True, "parallel_write_safe": True}
