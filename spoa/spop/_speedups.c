/*
 * Optional C fast path of spoa.spop.codec.decode_messages (SPOE.txt 3.2.6).
 *
 * The pure-Python _decode_messages_py in codec.py is the reference: this
 * function returns equal results and raises the same errors for every input.
 * It decodes inline only what fills a route message: names of fewer than 240
 * bytes (through the codec's own name cache, filled under the same limit) and
 * STRING values with a one-byte length. Everything else (other data types,
 * multi-byte lengths, malformed names) goes to the codec's Python decode_typed
 * and decode_name, handed over once by setup(), so the two implementations
 * cannot drift apart on the rare cases.
 *
 * Every read of the buffer is checked against `end`, and `end` against the
 * buffer's size, before it happens.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* SPOE.txt 3.1: a length below 240 is its own one-byte varint. */
#define ONE_BYTE_VARINT_LIMIT 240
/* SPOE.txt 3.1: the type byte of a STRING with no flags. */
#define TYPE_STRING 8
/* codec.STRING_ERRORS: strings are raw bytes, decoded without failing. */
#define STRING_ERRORS "surrogateescape"

typedef struct {
    PyObject *message_class;
    PyObject *decode_typed;
    PyObject *decode_name;
    PyObject *decode_error;
    PyObject *name_cache; /* dict: raw name bytes -> str */
    Py_ssize_t name_cache_limit;
} speedups_state;

static inline speedups_state *
get_state(PyObject *module)
{
    return (speedups_state *)PyModule_GetState(module);
}

/* Raise codec.DecodeError(message); its status defaults to Status.INVALID. */
static void
decode_error(speedups_state *st, const char *message)
{
    PyErr_SetString(st->decode_error, message);
}

/*
 * Call a Python decoder `func(buf, pos, end) -> (value, next)`. On success
 * store a new reference to value in *out and return next; on error return -1.
 * `*end_obj` is `end` as an int, made on first use and owned by the caller.
 */
static Py_ssize_t
call_decoder(PyObject *func, PyObject *buf, Py_ssize_t pos, Py_ssize_t end,
             PyObject **end_obj, PyObject **out)
{
    if (*end_obj == NULL && (*end_obj = PyLong_FromSsize_t(end)) == NULL) {
        return -1;
    }
    PyObject *pos_obj = PyLong_FromSsize_t(pos);
    if (pos_obj == NULL) {
        return -1;
    }
    PyObject *args[3] = {buf, pos_obj, *end_obj};
    PyObject *result = PyObject_Vectorcall(func, args, 3, NULL);
    Py_DECREF(pos_obj);
    if (result == NULL) {
        return -1;
    }
    if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2) {
        PyErr_SetString(PyExc_TypeError, "decoder did not return a (value, offset) pair");
        Py_DECREF(result);
        return -1;
    }
    Py_ssize_t next = PyLong_AsSsize_t(PyTuple_GET_ITEM(result, 1));
    if (next == -1 && PyErr_Occurred()) {
        Py_DECREF(result);
        return -1;
    }
    /* The caller reads buf[next] next: never trust an offset outside the frame. */
    if (next < pos || next > end) {
        PyErr_SetString(PyExc_ValueError, "decoder returned an offset outside the frame");
        Py_DECREF(result);
        return -1;
    }
    *out = Py_NewRef(PyTuple_GET_ITEM(result, 0));
    Py_DECREF(result);
    return next;
}

/*
 * codec.decode_name at p[pos:end]: new reference in *out, next offset
 * returned, or -1 with an exception set.
 */
static Py_ssize_t
decode_name(speedups_state *st, PyObject *buf, const unsigned char *p, Py_ssize_t pos,
            Py_ssize_t end, PyObject **end_obj, PyObject **out)
{
    if (pos >= end || p[pos] >= ONE_BYTE_VARINT_LIMIT) {
        /* No length byte, or a multi-byte length: the general decoder. */
        return call_decoder(st->decode_name, buf, pos, end, end_obj, out);
    }
    Py_ssize_t length = p[pos];
    Py_ssize_t start = pos + 1;
    if (length > end - start) {
        decode_error(st, "name longer than its frame");
        return -1;
    }
    PyObject *raw = PyBytes_FromStringAndSize((const char *)p + start, length);
    if (raw == NULL) {
        return -1;
    }
    PyObject *name;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyDict_GetItemRef(st->name_cache, raw, &name) < 0) {
        Py_DECREF(raw);
        return -1;
    }
#else
    name = Py_XNewRef(PyDict_GetItemWithError(st->name_cache, raw));
    if (name == NULL && PyErr_Occurred()) {
        Py_DECREF(raw);
        return -1;
    }
#endif
    if (name == NULL) {
        name = PyUnicode_DecodeUTF8((const char *)p + start, length, STRING_ERRORS);
        if (name == NULL
            || (PyDict_GET_SIZE(st->name_cache) < st->name_cache_limit
                && PyDict_SetItem(st->name_cache, raw, name) < 0)) {
            Py_XDECREF(name);
            Py_DECREF(raw);
            return -1;
        }
    }
    Py_DECREF(raw);
    *out = name;
    return start + length;
}

PyDoc_STRVAR(decode_messages_doc,
"decode_messages(buf, pos, end, /)\n--\n\n"
"Decode a LIST-OF-MESSAGES filling buf[pos:end]; C version of\n"
"spoa.spop.codec._decode_messages_py, with the same results and errors.\n"
"buf must be bytes; a non-empty range must lie within buf (ValueError).");

static PyObject *
decode_messages(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError,
                     "decode_messages() takes exactly 3 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *buf = args[0];
    if (!PyBytes_Check(buf)) {
        PyErr_Format(PyExc_TypeError, "decode_messages() needs bytes, not %.100s",
                     Py_TYPE(buf)->tp_name);
        return NULL;
    }
    /* Clipped on overflow, like Python compares huge ints: pos >= end stays so. */
    Py_ssize_t pos = PyNumber_AsSsize_t(args[1], NULL);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t end = PyNumber_AsSsize_t(args[2], NULL);
    if (end == -1 && PyErr_Occurred()) {
        return NULL;
    }
    speedups_state *st = get_state(module);
    if (st == NULL || st->message_class == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "spoa.spop._speedups.setup() was not called");
        return NULL;
    }
    PyObject *messages = PyList_New(0);
    if (messages == NULL || pos >= end) {
        return messages;
    }
    /* Python would index from the end or past it here; refuse instead. */
    if (pos < 0 || end > PyBytes_GET_SIZE(buf)) {
        Py_DECREF(messages);
        PyErr_SetString(PyExc_ValueError, "pos and end must lie within buf");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(buf);
    PyObject *end_obj = NULL;
    PyObject *name = NULL, *arg_args = NULL, *arg_name = NULL, *value = NULL;

    while (pos < end) {
        if ((pos = decode_name(st, buf, p, pos, end, &end_obj, &name)) < 0) {
            goto error;
        }
        if (pos >= end) {
            decode_error(st, "message without an argument count");
            goto error;
        }
        int nb_args = p[pos++];
        if ((arg_args = PyDict_New()) == NULL) {
            goto error;
        }
        for (int i = 0; i < nb_args; i++) {
            if ((pos = decode_name(st, buf, p, pos, end, &end_obj, &arg_name)) < 0) {
                goto error;
            }
            if (end - pos >= 2 && p[pos] == TYPE_STRING
                && p[pos + 1] < ONE_BYTE_VARINT_LIMIT) {
                Py_ssize_t length = p[pos + 1];
                Py_ssize_t start = pos + 2;
                if (length > end - start) {
                    decode_error(st, "string longer than its frame");
                    goto error;
                }
                value = PyUnicode_DecodeUTF8((const char *)p + start, length, STRING_ERRORS);
                if (value == NULL) {
                    goto error;
                }
                pos = start + length;
            }
            else if ((pos = call_decoder(st->decode_typed, buf, pos, end, &end_obj,
                                         &value)) < 0) {
                goto error;
            }
            /* A repeated name keeps its first place and takes the last value. */
            if (PyDict_SetItem(arg_args, arg_name, value) < 0) {
                goto error;
            }
            Py_CLEAR(arg_name);
            Py_CLEAR(value);
        }
        PyObject *call_args[2] = {name, arg_args};
        PyObject *message = PyObject_Vectorcall(st->message_class, call_args, 2, NULL);
        if (message == NULL) {
            goto error;
        }
        Py_CLEAR(name);
        Py_CLEAR(arg_args);
        int appended = PyList_Append(messages, message);
        Py_DECREF(message);
        if (appended < 0) {
            goto error;
        }
    }
    Py_XDECREF(end_obj);
    return messages;

error:
    Py_XDECREF(value);
    Py_XDECREF(arg_name);
    Py_XDECREF(arg_args);
    Py_XDECREF(name);
    Py_XDECREF(end_obj);
    Py_DECREF(messages);
    return NULL;
}

PyDoc_STRVAR(setup_doc,
"setup(message_class, decode_typed, decode_name, decode_error_class, name_cache,\n"
"      name_cache_limit, /)\n--\n\n"
"Bind decode_messages to the codec's Message class, its Python decoders for\n"
"the rare cases, DecodeError, and its name cache (a dict of at most\n"
"name_cache_limit entries). Called by spoa.spop.codec at import.");

static PyObject *
setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "setup() takes exactly 6 arguments (%zd given)", nargs);
        return NULL;
    }
    for (int i = 0; i < 3; i++) {
        if (!PyCallable_Check(args[i])) {
            PyErr_Format(PyExc_TypeError, "setup() argument %d must be callable", i + 1);
            return NULL;
        }
    }
    if (!PyExceptionClass_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "setup() argument 4 must be an exception class");
        return NULL;
    }
    if (!PyDict_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "setup() argument 5 must be a dict");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[5]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "setup() argument 6 must not be negative");
        return NULL;
    }
    speedups_state *st = get_state(module);
    if (st == NULL) {
        /* Created but never executed (importlib's create_module alone). */
        PyErr_SetString(PyExc_RuntimeError, "spoa.spop._speedups was not initialised");
        return NULL;
    }
    Py_XSETREF(st->message_class, Py_NewRef(args[0]));
    Py_XSETREF(st->decode_typed, Py_NewRef(args[1]));
    Py_XSETREF(st->decode_name, Py_NewRef(args[2]));
    Py_XSETREF(st->decode_error, Py_NewRef(args[3]));
    Py_XSETREF(st->name_cache, Py_NewRef(args[4]));
    st->name_cache_limit = limit;
    Py_RETURN_NONE;
}

static PyMethodDef speedups_methods[] = {
    {"decode_messages", (PyCFunction)(void (*)(void))decode_messages, METH_FASTCALL,
     decode_messages_doc},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL, setup_doc},
    {NULL, NULL, 0, NULL},
};

static int
speedups_traverse(PyObject *module, visitproc visit, void *arg)
{
    speedups_state *st = get_state(module);
    Py_VISIT(st->message_class);
    Py_VISIT(st->decode_typed);
    Py_VISIT(st->decode_name);
    Py_VISIT(st->decode_error);
    Py_VISIT(st->name_cache);
    return 0;
}

static int
speedups_clear(PyObject *module)
{
    speedups_state *st = get_state(module);
    Py_CLEAR(st->message_class);
    Py_CLEAR(st->decode_typed);
    Py_CLEAR(st->decode_name);
    Py_CLEAR(st->decode_error);
    Py_CLEAR(st->name_cache);
    return 0;
}

static void
speedups_free(void *module)
{
    speedups_clear((PyObject *)module);
}

static PyModuleDef_Slot speedups_slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "spoa.spop._speedups",
    .m_doc = "Optional C fast path of spoa.spop.codec.decode_messages.",
    .m_size = sizeof(speedups_state),
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
    .m_traverse = speedups_traverse,
    .m_clear = speedups_clear,
    .m_free = speedups_free,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
