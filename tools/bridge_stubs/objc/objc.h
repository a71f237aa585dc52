// Apple's <objc/objc.h>, as far as metal-cpp and the bridge use it (arm64 macOS: BOOL is bool).
#pragma once

#ifdef __cplusplus
#define OBJC_EXPORT extern "C" __attribute__((visibility("default")))
#else
#define OBJC_EXPORT extern __attribute__((visibility("default")))
#endif

typedef struct objc_class* Class;
struct objc_object {
  Class isa;
};
typedef struct objc_object* id;
typedef struct objc_selector* SEL;
typedef bool BOOL;

#define YES __objc_yes
#define NO __objc_no
#ifndef nil
#define nil nullptr
#endif

OBJC_EXPORT SEL sel_registerName(const char* str);
