"""Question templates per language, the frames of the interrogatives the offline generator writes.

``{p}`` and ``{q}`` take key phrases of a context, ``{a}`` an action phrase ("remove a package"). The frames are
the short forms people type into a search box: what is, how do I, why does ... not work, where is, the difference
between two things. Grammar around a slot is kept neutral where a language inflects (a question typed into a search
box is rarely perfect either). Languages without frames here get keyword queries and the bare phrase with a
question mark.
"""

from __future__ import annotations

# language -> (frames with one phrase, frames with two phrases, frames with an action phrase)
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "en": (
        ("What is {p}?", "How do I use {p}?", "How does {p} work?", "How do I configure {p}?", "What does {p} do?",
         "Why does {p} not work?", "Where is {p}?", "How can I change {p}?", "What is {p} used for?", "{p}?",
         "Is there a way to see {p}?", "How do I get {p}?"),
        ("What is the difference between {p} and {q}?", "How do I use {p} with {q}?", "{p} vs {q}",
         "Can {p} be used for {q}?", "How does {p} affect {q}?"),
        ("How do I {a}?", "How to {a}", "How can I {a}?", "Is it possible to {a}?", "Why can't I {a}?"),
    ),
    "de": (
        ("Was ist {p}?", "Wie benutze ich {p}?", "Wie funktioniert {p}?", "Wie konfiguriere ich {p}?",
         "Was macht {p}?", "Warum funktioniert {p} nicht?", "Wo finde ich {p}?", "Wie kann ich {p} ändern?",
         "Wofür ist {p}?", "{p}?"),
        ("Was ist der Unterschied zwischen {p} und {q}?", "Wie verwende ich {p} mit {q}?", "{p} oder {q}?"),
        (),
    ),
    "fr": (
        ("Qu'est-ce que {p} ?", "Comment utiliser {p} ?", "Comment fonctionne {p} ?", "Comment configurer {p} ?",
         "À quoi sert {p} ?", "Pourquoi {p} ne fonctionne pas ?", "Où trouver {p} ?", "Comment modifier {p} ?",
         "{p} ?"),
        ("Quelle est la différence entre {p} et {q} ?", "Comment utiliser {p} avec {q} ?"),
        ("Comment {a} ?", "Comment puis-je {a} ?", "Est-il possible de {a} ?"),
    ),
    "es": (
        ("¿Qué es {p}?", "¿Cómo uso {p}?", "¿Cómo funciona {p}?", "¿Cómo configurar {p}?", "¿Para qué sirve {p}?",
         "¿Por qué no funciona {p}?", "¿Dónde encuentro {p}?", "¿Cómo cambiar {p}?", "¿{p}?"),
        ("¿Cuál es la diferencia entre {p} y {q}?", "¿Cómo usar {p} con {q}?"),
        ("¿Cómo {a}?", "¿Cómo puedo {a}?", "¿Es posible {a}?"),
    ),
    "it": (
        ("Che cos'è {p}?", "Come si usa {p}?", "Come funziona {p}?", "Come configurare {p}?", "A cosa serve {p}?",
         "Perché {p} non funziona?", "Dove si trova {p}?", "Come modificare {p}?", "{p}?"),
        ("Qual è la differenza tra {p} e {q}?", "Come usare {p} con {q}?"),
        ("Come {a}?", "Come posso {a}?", "È possibile {a}?"),
    ),
    "pt": (
        ("O que é {p}?", "Como usar {p}?", "Como funciona {p}?", "Como configurar {p}?", "Para que serve {p}?",
         "Por que {p} não funciona?", "Onde encontro {p}?", "Como alterar {p}?", "{p}?"),
        ("Qual a diferença entre {p} e {q}?", "Como usar {p} com {q}?"),
        ("Como {a}?", "Como posso {a}?", "É possível {a}?"),
    ),
    "nl": (
        ("Wat is {p}?", "Hoe gebruik ik {p}?", "Hoe werkt {p}?", "Hoe configureer ik {p}?", "Waarvoor dient {p}?",
         "Waarom werkt {p} niet?", "Waar vind ik {p}?", "Hoe wijzig ik {p}?", "{p}?"),
        ("Wat is het verschil tussen {p} en {q}?", "Hoe gebruik ik {p} met {q}?"),
        (),
    ),
    "sv": (
        ("Vad är {p}?", "Hur använder jag {p}?", "Hur fungerar {p}?", "Hur konfigurerar jag {p}?", "Vad gör {p}?",
         "Varför fungerar inte {p}?", "Var hittar jag {p}?", "Hur ändrar jag {p}?", "{p}?"),
        ("Vad är skillnaden mellan {p} och {q}?", "Hur använder jag {p} med {q}?"),
        (),
    ),
    "pl": (
        ("Co to jest {p}?", "Jak używać {p}?", "Jak działa {p}?", "Jak skonfigurować {p}?", "Do czego służy {p}?",
         "Dlaczego {p} nie działa?", "Gdzie znaleźć {p}?", "Jak zmienić {p}?", "{p}?"),
        ("Jaka jest różnica między {p} a {q}?", "Jak używać {p} z {q}?"),
        (),
    ),
    "cs": (
        ("Co je {p}?", "Jak používat {p}?", "Jak funguje {p}?", "Jak nastavit {p}?", "K čemu slouží {p}?",
         "Proč nefunguje {p}?", "Kde najdu {p}?", "Jak změnit {p}?", "{p}?"),
        ("Jaký je rozdíl mezi {p} a {q}?", "Jak použít {p} s {q}?"),
        (),
    ),
    "ru": (
        ("Что такое {p}?", "Как использовать {p}?", "Как работает {p}?", "Как настроить {p}?",
         "Для чего нужен {p}?", "Почему не работает {p}?", "Где найти {p}?", "Как изменить {p}?", "{p}?"),
        ("В чём разница между {p} и {q}?", "Как использовать {p} с {q}?"),
        (),
    ),
    "uk": (
        ("Що таке {p}?", "Як використовувати {p}?", "Як працює {p}?", "Як налаштувати {p}?",
         "Для чого потрібен {p}?", "Чому не працює {p}?", "Де знайти {p}?", "Як змінити {p}?", "{p}?"),
        ("Яка різниця між {p} і {q}?", "Як використовувати {p} з {q}?"),
        (),
    ),
    "tr": (
        ("{p} nedir?", "{p} nasıl kullanılır?", "{p} nasıl çalışır?", "{p} nasıl yapılandırılır?",
         "{p} ne işe yarar?", "{p} neden çalışmıyor?", "{p} nerede?", "{p} nasıl değiştirilir?", "{p}?"),
        ("{p} ile {q} arasındaki fark nedir?", "{p} ile {q} nasıl kullanılır?"),
        (),
    ),
    "ja": (
        ("{p}とは何ですか？", "{p}の使い方は？", "{p}はどのように動作しますか？", "{p}を設定するには？", "{p}は何に使いますか？",
         "{p}が動かないのはなぜ？", "{p}はどこにありますか？", "{p}を変更するには？", "{p}？"),
        ("{p}と{q}の違いは？", "{q}で{p}を使うには？"),
        (),
    ),
    "zh": (
        ("{p}是什么？", "如何使用{p}？", "{p}是如何工作的？", "如何配置{p}？", "{p}有什么用？", "为什么{p}不工作？",
         "{p}在哪里？", "如何修改{p}？", "{p}？"),
        ("{p}和{q}有什么区别？", "如何将{p}与{q}一起使用？"),
        (),
    ),
    "ko": (
        ("{p}란 무엇인가요?", "{p} 사용 방법은?", "{p}는 어떻게 작동하나요?", "{p} 설정 방법은?", "{p}는 무엇에 쓰이나요?",
         "{p}가 작동하지 않는 이유는?", "{p}는 어디에 있나요?", "{p}를 변경하려면?", "{p}?"),
        ("{p}와 {q}의 차이점은?", "{q}에서 {p}를 사용하려면?"),
        (),
    ),
}
_FALLBACK = (("{p}?",), ("{p} {q}?",), ())


def templates(language: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The frames of ``language`` (one phrase, two phrases, an action phrase); a bare ``{p}?`` for others."""
    return TEMPLATES.get(language, _FALLBACK)
