"""The curation loop: pseudo-label datasets into FiftyOne (`label`), review them (`review`, the App and
ovseg-app's correction tab), export COCO (`export`) and retrain from the curated labels (`retrain`)."""
