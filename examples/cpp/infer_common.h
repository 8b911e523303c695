// What both example programs share: the command line, the inputs (.npy files), the lengths rule
// (a missing <modality>_lengths input means the full length; values outside [0, L] are refused) and
// streaming (a graph with state.* inputs is fed chunk by chunk, its next_state.* carried over).
// The runtime-specific part is a Runner: its inputs, outputs and one synchronous run.
#pragma once

#include "npy.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace cm_example
{

struct IoSpec
{
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape; // -1: dynamic
};

struct Runner
{
    virtual ~Runner() = default;
    virtual std::vector<IoSpec> inputs() = 0;
    virtual std::vector<IoSpec> outputs() = 0;
    virtual std::map<std::string, Tensor> run(std::map<std::string, Tensor> const& feeds) = 0;
};

struct Options
{
    std::string model;
    std::map<std::string, std::string> inputFiles; // --input name=file.npy
    int64_t chunk = 0;                             // --chunk T (streaming graphs); 0: the whole sequence
    std::string output;                            // -o out.npy
    std::map<std::string, std::string> extra;      // program-specific --key value (or --flag)
};

inline bool startsWith(std::string const& s, std::string const& p)
{
    return s.compare(0, p.size(), p) == 0;
}
inline bool endsWith(std::string const& s, std::string const& p)
{
    return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// flags: program-specific options without a value; valued: with one.
inline Options parseArgs(int argc, char** argv, std::vector<std::string> const& flags,
    std::vector<std::string> const& valued, std::string const& usage)
{
    Options o;
    auto need = [&](int& i) -> std::string {
        if (i + 1 >= argc)
            throw InputError(std::string(argv[i]) + " needs a value; usage: " + usage);
        return argv[++i];
    };
    for (int i = 1; i < argc; ++i)
    {
        std::string a = argv[i];
        if (a == "-h" || a == "--help")
        {
            std::cout << "usage: " << usage << "\n";
            std::exit(0);
        }
        if (a == "--input")
        {
            std::string v = need(i);
            size_t eq = v.find('=');
            if (eq == std::string::npos || eq == 0)
                throw InputError("--input takes NAME=FILE.npy, got '" + v + "'");
            o.inputFiles[v.substr(0, eq)] = v.substr(eq + 1);
        }
        else if (a == "--chunk")
        {
            std::string v = need(i);
            char* end = nullptr;
            long long c = std::strtoll(v.c_str(), &end, 10);
            if (end == v.c_str() || *end != '\0' || c < 1)
                throw InputError("--chunk takes a positive integer, got '" + v + "'");
            o.chunk = c;
        }
        else if (a == "-o" || a == "--output")
            o.output = need(i);
        else if (std::find(flags.begin(), flags.end(), a) != flags.end())
            o.extra[a] = "1";
        else if (std::find(valued.begin(), valued.end(), a) != valued.end())
            o.extra[a] = need(i);
        else if (!a.empty() && a[0] == '-')
            throw InputError("unknown option " + a + "; usage: " + usage);
        else if (o.model.empty())
            o.model = a;
        else
            throw InputError("one model only (got '" + o.model + "' and '" + a + "'); usage: " + usage);
    }
    if (o.model.empty())
        throw InputError("no model given; usage: " + usage);
    for (auto const& kv : o.inputFiles)
        if (kv.second == o.output)
            throw InputError("-o " + o.output + " would overwrite input " + kv.first);
    return o;
}

// Runs the model on the inputs (whole, or chunk by chunk for a streaming graph) and returns `output`.
inline Tensor infer(Runner& runner, Options const& opt)
{
    std::vector<IoSpec> const ins = runner.inputs();
    std::map<std::string, Tensor> given;
    for (auto const& kv : opt.inputFiles)
        given[kv.first] = loadNpy(kv.second, kv.first);
    std::vector<IoSpec> mods, lens, states;
    for (IoSpec const& s : ins)
        (startsWith(s.name, "state.") ? states : endsWith(s.name, "_lengths") ? lens : mods).push_back(s);
    for (auto const& kv : given)
    {
        bool known = false;
        for (IoSpec const& s : ins)
            known = known || (s.name == kv.first && !startsWith(s.name, "state."));
        if (!known)
            throw InputError("the model has no input '" + kv.first + "' (states are carried, not given)");
    }
    int64_t batch = -1, steps = -1;
    for (IoSpec const& s : mods)
    {
        auto it = given.find(s.name);
        if (it == given.end())
            throw InputError("missing input '" + s.name + "' (--input " + s.name + "=FILE.npy)");
        Tensor const& t = it->second;
        if (t.dtype != s.dtype)
            throw InputError("input '" + s.name + "' has dtype " + t.dtype + ", expected " + s.dtype);
        if (t.shape.size() != s.shape.size())
            throw InputError("input '" + s.name + "' has shape " + t.shapeString() + ", expected rank "
                + std::to_string(s.shape.size()));
        for (size_t a = 0; a < s.shape.size(); ++a)
            if (s.shape[a] >= 0 && s.shape[a] != t.shape[a])
                throw InputError("input '" + s.name + "' axis " + std::to_string(a) + " is "
                    + std::to_string(t.shape[a]) + ", expected " + std::to_string(s.shape[a]));
        if (batch >= 0 && t.shape[0] != batch)
            throw InputError("input '" + s.name + "' has batch " + std::to_string(t.shape[0]) + ", others "
                + std::to_string(batch));
        batch = t.shape[0];
        if (!states.empty())
        {
            if (steps >= 0 && t.shape[1] != steps)
                throw InputError("a stream takes one length for every modality: '" + s.name + "' has "
                    + std::to_string(t.shape[1]) + " steps, others " + std::to_string(steps));
            steps = t.shape[1];
        }
    }
    // lengths: given ones checked, missing ones full
    for (IoSpec const& s : lens)
    {
        std::string const mod = s.name.substr(0, s.name.size() - 8);
        int64_t const L = given.at(mod).shape[1];
        auto it = given.find(s.name);
        if (it == given.end())
        {
            Tensor t = Tensor::zeros(s.name, "int64", {batch});
            for (int64_t i = 0; i < batch; ++i)
                t.i64()[i] = L;
            given[s.name] = t;
            continue;
        }
        Tensor const& t = it->second;
        if (t.dtype != "int64" || t.shape.size() != 1 || t.shape[0] != batch)
            throw InputError("input '" + s.name + "' must be int64 (" + std::to_string(batch) + ",), got "
                + t.dtype + " " + t.shapeString());
        for (int64_t i = 0; i < batch; ++i)
            if (t.i64()[i] < 0 || t.i64()[i] > L)
                throw InputError("input '" + s.name + "' must hold valid lengths in [0, " + std::to_string(L)
                    + "], got " + std::to_string(t.i64()[i]) + " at sample " + std::to_string(i));
    }
    if (states.empty())
    {
        if (opt.chunk > 0)
            throw InputError("--chunk needs a streaming graph (model.stream*.onnx or its engine)");
        return runner.run(given).at("output");
    }
    // streaming: zero state, then chunk after chunk
    std::map<std::string, Tensor> state;
    for (IoSpec const& s : states)
    {
        std::vector<int64_t> shape = s.shape;
        shape[0] = batch;
        for (int64_t d : shape)
            if (d < 0)
                throw InputError("state '" + s.name + "' has a dynamic axis besides the batch");
        state[s.name] = Tensor::zeros(s.name, s.dtype, shape);
    }
    int64_t const T = opt.chunk > 0 ? opt.chunk : steps;
    Tensor out;
    for (int64_t t0 = 0; t0 < steps || t0 == 0; t0 += T)
    {
        int64_t const n = std::min(T, steps - t0);
        std::map<std::string, Tensor> feeds = state;
        for (IoSpec const& s : mods)
            feeds[s.name] = given.at(s.name).sliceAxis1(t0, n);
        for (IoSpec const& s : lens)
        {
            Tensor c = given.at(s.name);
            for (int64_t i = 0; i < batch; ++i)
                c.i64()[i] = std::max<int64_t>(0, std::min<int64_t>(c.i64()[i] - t0, n));
            feeds[s.name] = c;
        }
        std::map<std::string, Tensor> res = runner.run(feeds);
        for (IoSpec const& s : states)
        {
            Tensor next = res.at("next_" + s.name);
            next.name = s.name;
            state[s.name] = next;
        }
        out = res.at("output");
        if (steps == 0)
            break;
    }
    return out;
}

inline void printTensor(Tensor const& t)
{
    std::printf("%s %s %s\n", t.name.c_str(), t.dtype.c_str(), t.shapeString().c_str());
    int64_t const n = t.count(), row = t.shape.empty() ? 1 : t.shape.back();
    for (int64_t i = 0; i < n; ++i)
        std::printf("%s%.7g", (i % row == 0) ? "  " : " ", valueAt(t, i)), (i % row == row - 1) ? (void) std::printf("\n") : (void) 0;
}

// main() around a program body: exit 2 for bad input, 3 for anything else, one line on stderr.
inline int runMain(char const* prog, std::function<int()> const& body)
{
    try
    {
        return body();
    }
    catch (InputError const& e)
    {
        std::fprintf(stderr, "%s: error: %s\n", prog, e.what());
        return 2;
    }
    catch (std::exception const& e)
    {
        std::fprintf(stderr, "%s: failed: %s\n", prog, e.what());
        return 3;
    }
}

} // namespace cm_example
