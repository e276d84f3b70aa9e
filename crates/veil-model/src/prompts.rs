//! Sample prompts shared by the figures that run the model over many questions (encryption
//! exactness, verification calibration), so each figure is measured on the same text.

/// Twenty-five varied questions: facts, code, lists, stories, arithmetic, other languages.
pub const SAMPLE_PROMPTS: [&str; 25] = [
    "What is the capital of France?",
    "Write a haiku about autumn rain.",
    "Explain photosynthesis to a ten-year-old.",
    "List three prime numbers greater than 50.",
    "Write a Python function that reverses a string.",
    "What is 17 times 23?",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the benefits of regular exercise?",
    "Write a short story that begins with a knock at the door.",
    "How does a bicycle stay upright?",
    "Name five animals that live in the ocean.",
    "What is the difference between weather and climate?",
    "Write a SQL query that counts rows in a table named users.",
    "Describe the water cycle.",
    "Quelle est la plus grande ville du Canada ?",
    "Suggest a name for a friendly robot.",
    "What should I pack for a weekend hiking trip?",
    "How do vaccines work?",
    "Write a limerick about a cat.",
    "What is a black hole?",
    "Give three tips for learning a new language.",
    "Explain what a hash function is.",
];
