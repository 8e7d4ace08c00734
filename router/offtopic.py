"""Generic text that belongs to no expert, written for the project: the "none" class of the
routing head (router/head.py). Everyday requests in the five ways users ask (stories, lay
wording, bare keywords, exam-style questions, tasks), over topics no shipped domain covers.

Not evaluation data: tests/test_router_userset.py checks that none of it is a near copy of a
routing-set query. Adding a domain needs no edit here; a domain whose topic appears below (a
cooking expert, say) drops the lines its own exemplars are near (router/head.py).
"""

from __future__ import annotations

OFF_TOPIC = (
    # ---------------------------------------------------------------- chit-chat and probes
    "hi", "hello there", "thanks, that helps", "test", "asdf", "ok", "tell me a joke",
    "what can you do?", "good morning!", "who are you",
    # ---------------------------------------------------------------- keywords
    "pancake recipe fluffy", "best budget headphones", "how to tie a tie", "tent for two people",
    "paint colors living room", "knitting scarf pattern", "bluetooth speaker not pairing",
    "football world cup winners", "cheap hotels Rome", "dog food brands", "yoga for beginners",
    "sql join types", "git undo last commit", "rust borrow checker", "css center a div",
    "guitar chords for beginners", "oil change interval", "best sci-fi novels",
    "minecraft server setup", "bread machine settings", "moving house checklist",
    "camping stove fuel", "sunflower planting time", "Eiffel tower height",
    "tiramisu without eggs", "photography night sky settings", "ski resorts Austria",
    "origami crane steps", "Linux disk space full", "birthday party themes",
    # ---------------------------------------------------------------- lay wording
    "why does bread go stale faster in the fridge than on the counter",
    "how do I get my houseplants to stop dropping their leaves in winter",
    "what is the best way to clean a cast iron pan without ruining it",
    "why does my cat bring me dead birds and should I be worried about it",
    "how do noise cancelling headphones actually block out the sound around you",
    "why is the sky blue during the day but red and orange at sunset",
    "what's the easiest way to learn to swim as an adult who is scared of water",
    "how do I stop my glasses from fogging up when I wear a scarf",
    "why do my jeans shrink in the dryer but my t-shirts don't",
    "how do I choose a good watermelon at the supermarket",
    "what makes some people better at singing than others, can anyone learn",
    "why does my dog spin around before lying down on his bed",
    "how can I make my small apartment feel bigger without buying new furniture",
    "why do the leaves on trees change color in the autumn",
    "is it ok to leave my laptop plugged in all the time or does it hurt the battery",
    "how do magicians do the trick where they cut a person in half",
    "what is the best way to memorize lines for a school play",
    "why do some cheeses smell so strong but taste mild",
    "how do I get rid of fruit flies in my kitchen for good",
    "what should I do if my car battery dies in a supermarket car park",
    "how do airplanes stay up in the air when they are so heavy",
    "why does my sourdough taste more sour some weeks than others",
    "how can I stop procrastinating on my hobby projects in the evenings",
    "what's the difference between an espresso and a normal coffee",
    "why do people clap at the end of a flight when the plane lands",
    # ---------------------------------------------------------------- exam-style
    "Who painted the ceiling of the Sistine Chapel, and over how many years did the work take?",
    "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?",
    "Explain the difference between a simile and a metaphor, with one example of each.",
    "Which river is the longest in Africa, and through which countries does it flow?",
    "What is the function of a CPU cache, and why does it make programs faster?",
    "Name three works by William Shakespeare and state whether each is a comedy or a tragedy.",
    "What causes thunder during a storm, and why do we see the lightning first?",
    "In chess, what is castling and under what conditions is it allowed?",
    "Describe the main features of Gothic architecture in medieval cathedrals.",
    "What is the difference between a virus and a worm in computer security?",
    "Which empire built Machu Picchu, and in roughly which century was it built?",
    "Explain how a rainbow forms when sunlight passes through raindrops.",
    "What are the rules for forming the past tense of regular verbs in Spanish?",
    "What is the difference between HTTP and HTTPS in web browsing?",
    "Who was the first person to walk on the Moon, and in which year did it happen?",
    "Explain what a haiku is and describe its syllable pattern.",
    "Which instruments make up a standard string quartet?",
    "What is the greenhouse effect, and which gases contribute most to it?",
    "Describe the rules of tennis scoring from love to game.",
    "What is recursion in programming? Give a short example in pseudocode.",
    # ---------------------------------------------------------------- tasks
    "Write a short thank-you note to my colleague who covered my shifts while I was away.",
    "Draft an invitation for a neighborhood summer barbecue next Saturday afternoon.",
    "Write a limerick about a cat who is afraid of cucumbers.",
    "Create a weekly cleaning rota for four flatmates sharing a kitchen and a bathroom.",
    "Suggest five fun indoor activities for children on a rainy weekend.",
    "Write a bash script that renames every .jpeg file in a folder to .jpg.",
    "Draft a short speech for my best friend's wedding that is funny but kind.",
    "Write a product review of a pair of running shoes I've worn for three months.",
    "Plan a one-day itinerary for a first visit to Barcelona on foot.",
    "Write a SQL query that lists the ten customers with the most orders.",
    "Create a playlist of upbeat songs for a long summer road trip.",
    "Write a short bedtime story about a dragon who is afraid of the dark.",
    "Draft a message to my landlord's agent asking when the window cleaners are coming.",
    "Summarize the rules of the card game Uno for someone who has never played.",
    "Give me a recipe for a quick tomato pasta sauce using tinned tomatoes.",
    "Write a tweet announcing the opening of a new bakery in our town.",
    "Translate 'good morning, how are you today' into German and Japanese.",
    "Create a simple workout routine I can do at home with no equipment.",
    "Write a JavaScript function that checks whether a string is a palindrome.",
    "Draft a polite reply declining an invitation to a friend's dinner party.",
    "Come up with a name and a slogan for a small bicycle repair shop.",
    "Write a haiku about the first snow of winter.",
    "Make a list of ten questions to ask when viewing a flat to rent.",
    "Describe a cozy reading corner for a short interior design blog post.",
    "Outline a short presentation about the history of the bicycle.",
    # ---------------------------------------------------------------- stories
    "We just moved to a new city and my eight-year-old hasn't made any friends yet at school. "
    "She cries some mornings before the bus comes. How can we help her settle in?",
    "I bought a secondhand bike for commuting, but the gears keep slipping when I pedal hard "
    "uphill. The shop is closed this week. Is this something I can adjust myself?",
    "My flatmate and I share a fridge and he keeps eating my food, even after I labelled "
    "everything. I don't want a big fight. How should I bring it up?",
    "I've been asked to give a toast at my parents' fortieth anniversary party, and I get very "
    "nervous speaking in front of people. What can I do to prepare and stay calm?",
    "Our family is going on a long car trip with two young kids and a dog, about nine hours "
    "each way. Last time it was chaos. How can we make the drive easier this time?",
    "I started a vegetable garden this spring, but slugs ate most of my lettuce seedlings "
    "overnight. I'd rather not use chemicals. What else can I try?",
    "My laptop fan started making a grinding noise and the computer shuts down when I play "
    "games. It's three years old. Should I clean it, repair it or replace it?",
    "I have a week off work and I want to finally learn to cook a few proper dinners instead "
    "of ordering takeaway. Where should a complete beginner start?",
    "My book club is reading a long historical novel and half the group stopped halfway. "
    "I'm hosting the next meeting. How can I keep the discussion lively?",
    "I've been playing chess online for a year and I'm stuck at the same rating. I mostly "
    "lose in the middle game. How should I practice to improve?",
    "Our office is planning a charity bake sale and I volunteered to organize it, but I've "
    "never done anything like this. What should I sort out first?",
    "I want to repaint my bedroom a dark green, but the room only gets light in the morning. "
    "My partner thinks it will feel like a cave. Who is right?",
    "I'm visiting my grandparents in the countryside and their internet is terribly slow. "
    "They only use it for video calls with us. Is there a cheap way to improve it?",
    "My daughter wants to start learning the piano, but we don't have space for a real one. "
    "Is a digital keyboard good enough for a beginner, and what should we look for?",
    "I've been trying to take better photos of my paintings to sell online, but the colors "
    "always look wrong. I use my phone by the window. What am I doing wrong?",
)
