#include "logging.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace cm_deploy
{
namespace plugin
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gFinder{nullptr};

char const* severityName(nvinfer1::ILogger::Severity s)
{
    switch (s)
    {
    case nvinfer1::ILogger::Severity::kINTERNAL_ERROR: return "INTERNAL_ERROR";
    case nvinfer1::ILogger::Severity::kERROR: return "ERROR";
    case nvinfer1::ILogger::Severity::kWARNING: return "WARNING";
    case nvinfer1::ILogger::Severity::kINFO: return "INFO";
    case nvinfer1::ILogger::Severity::kVERBOSE: return "VERBOSE";
    }
    return "?";
}
} // namespace

void setLoggerFinderImpl(nvinfer1::ILoggerFinder* finder)
{
    gFinder.store(finder);
}

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& msg)
{
    std::string const text = "CoupledScan plugin: " + msg;
    nvinfer1::ILoggerFinder* finder = gFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(severity, text.c_str());
        return;
    }
    // Without TensorRT (tests, the GPU harness) errors and warnings still reach the user.
    if (severity <= nvinfer1::ILogger::Severity::kWARNING || traceEnabled())
    {
        std::fprintf(stderr, "[%s] %s\n", severityName(severity), text.c_str());
        std::fflush(stderr);
    }
}

bool traceEnabled()
{
    static bool const enabled = [] {
        char const* v = std::getenv("CM_DEPLOY_PLUGIN_TRACE");
        return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
    }();
    return enabled;
}

void traceCall(char const* where, std::string const& detail)
{
    if (detail.empty())
    {
        std::fprintf(stderr, "[CoupledScan trace] %s\n", where);
    }
    else
    {
        std::fprintf(stderr, "[CoupledScan trace] %s %s\n", where, detail.c_str());
    }
    std::fflush(stderr);
}

} // namespace plugin
} // namespace cm_deploy
